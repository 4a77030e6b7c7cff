"""Config types, ranges and choices are checked by load_config, before any stage runs."""
import doctest
import os
from pathlib import Path

import pytest
import yaml

import nd_utils as nd
from nd_utils.similarity import list_similarities
import nd_utils.config
import nd_utils.config_schema
import nd_utils.context
from nd_utils.config import CONFIG_DIR, check_data_dir
from nd_utils.config_schema import validate_config


def error_of(overrides, config="offline") -> str:
    with pytest.raises(nd.ConfigError) as err:
        nd.load_config(config, overrides)
    return str(err.value)


# ------------------------------------------------------------------ the profiles pass, unchanged
@pytest.mark.parametrize("profile", ["offline", "paper"])
def test_profiles_validate_and_keep_their_values(profile):
    cfg = nd.load_config(profile)
    validate_config(cfg.to_dict(), profile)  # no error
    raw = yaml.safe_load((CONFIG_DIR / f"{profile}.yaml").read_text())
    # validation never rewrites values (cache keys hash them); only data_dir is made absolute
    assert {**raw, "data_dir": cfg["data_dir"]} == cfg.to_dict()
    assert Path(cfg["data_dir"]).is_absolute()


def test_docstring_examples_hold():
    for module in (nd_utils.config, nd_utils.config_schema, nd_utils.context):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.attempted > 0 and result.failed == 0, module.__name__


# ------------------------------------------------------------------ the cases of issue 9
def test_malformed_yaml_names_file_line_and_column(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("profile: broken\nseed: 0\ntarget:\n  name: x\n   layers: [a]\n")
    with pytest.raises(nd.ConfigError) as err:
        nd.load_config(path)
    msg = str(err.value)
    assert str(path) in msg and "line 5, column 10" in msg
    assert "mapping values are not allowed here" in msg and "Fix the file" in msg


def test_probe_limit_must_be_a_count():
    msg = error_of(["probe.limit=abc"])
    assert msg.splitlines()[0] == ("probe.limit: got 'abc'; expected null (all images) or a "
                                   "whole number >= 1, e.g. 40")
    nd.load_config("offline", ["probe.limit=40"])
    nd.load_config("offline", ["probe.limit=null"])


@pytest.mark.parametrize("key", ["activations.top_k", "activations.chunk_size"])
def test_activation_sizes_must_be_positive(key):
    msg = error_of([f"{key}=0"])
    assert msg.startswith(f"{key}: got 0; expected a whole number >= 1")
    assert "--set key=value" in msg.splitlines()[-1]


def test_dnd_neurons_per_layer_must_be_counts_or_unit_lists():
    msg = error_of(["dnd.neurons={head: abc}"])
    assert msg.startswith("dnd.neurons.head: got 'abc'; expected a count >= 1")
    assert "list of unit ids >= 0" in msg
    for bad, key in [("{head: 0, fc: [1]}", "dnd.neurons.head"),
                     ("{head: 2, fc: [1, -3]}", "dnd.neurons.fc"),
                     ("{head: 2, fc: []}", "dnd.neurons.fc"), ("true", "dnd.neurons")]:
        assert error_of([f"dnd.neurons={bad}"]).startswith(f"{key}: got "), bad
    # one count or one list for every layer is fine, as is a mapping naming every layer
    for good in ["3", "[0, 4]", "{head: 1, fc: [0]}"]:
        nd.load_config("offline", [f"dnd.neurons={good}"])


def test_dnd_neurons_must_name_every_dnd_layer():
    msg = error_of(["dnd.neurons={fc: 3}"])
    assert msg.startswith("dnd.neurons: got {'fc': 3}") and "(missing: head)" in msg


def test_target_layers_without_brackets_says_how_to_write_them():
    msg = error_of(["target.layers=head"])
    assert msg.splitlines()[0].startswith("target.layers: got 'head'; expected a non-empty list")
    assert "write target.layers=[head]" in msg


def test_device_choices():
    msg = error_of(["device=tpu"])
    assert msg.startswith("device: got 'tpu'; expected auto, cpu, cuda, cuda:N")
    assert "mps" in msg
    for good in ["auto", "cpu", "cuda", "cuda:1", "mps"]:
        assert nd.load_config("offline", [f"device={good}"])["device"] == good
    assert error_of(["device=cuda:x"]).startswith("device: got 'cuda:x'")


# ------------------------------------------------------------------ every other key
OTHER_BAD = [
    ("profile=null", "profile: got null"),
    ("seed=1.5", "seed: got 1.5; expected a whole number"),
    ("seed=true", "seed: got true"),
    ("data_dir=null", "data_dir: got null; expected a folder path"),
    ("plugins=my_plugins", "plugins: got 'my_plugins'; expected a list of importable module"),
    ("plugins=[my-plugins]", "plugins.0: got 'my-plugins'; expected an importable module name"),
    ("target.name=''", "target.name: got ''"),
    ("target.layers=[]", "target.layers: got []"),
    ("target.pooling=mean", "target.pooling: got 'mean'; expected avg, max or cls"),
    ("probe.sets=[]", "probe.sets: got []"),
    ("probe.sets=[{name: 3}]", "probe.sets.0.name: got 3; expected a probe set name"),
    ("probe.sets=[{name: offline-sampel}]", "probe.sets.0.name: got 'offline-sampel'"),
    ("activations.batch_size=0", "activations.batch_size: got 0; expected a whole number >= 1"),
    ("activations.num_workers=-1", "activations.num_workers: got -1; expected a whole number >= 0"),
    ("vlm.name=clip", "vlm.name: got 'clip'; expected conse or open_clip:<model>:<pretrained>"),
    ("vlm.batch_size=0", "vlm.batch_size: got 0"),
    ("vlm.dtype=half", "vlm.dtype: got 'half'; expected float32, float16 or bfloat16"),
    ("clip_dissect.concept_set=null", "clip_dissect.concept_set: got null"),
    ("clip_dissect.clean.dedupe=maybe", "clip_dissect.clean.dedupe: got 'maybe'"),
    ("clip_dissect.clean.drop_stopwords=1", "clip_dissect.clean.drop_stopwords: got 1"),
    ("clip_dissect.clean.drop_profanity=[]", "clip_dissect.clean.drop_profanity: got []"),
    ("clip_dissect.clean={dedup: true}", "clip_dissect.clean.dedup: unknown key"),
    ("clip_dissect.template='a photo'", "clip_dissect.template: got 'a photo'; expected null"),
    ("clip_dissect.similarity=soft_wmpi", "clip_dissect.similarity: got 'soft_wmpi'"),
    ("clip_dissect.hyperparameters={topk: 5}", "clip_dissect.hyperparameters.topk: got 5"),
    ("clip_dissect.hyperparameters=[1]", "clip_dissect.hyperparameters: got [1]"),
    ("clip_dissect.top_n=0", "clip_dissect.top_n: got 0; expected a whole number from 1 to 20"),
    ("clip_dissect.top_n=21", "clip_dissect.top_n: got 21"),
    ("evaluation.probe_sets=[]", "evaluation.probe_sets: got []"),
    ("evaluation.layer=null", "evaluation.layer: got null"),
    ("evaluation.concept_sets=words-10k", "evaluation.concept_sets: got 'words-10k'"),
    ("evaluation.similarities=[wpmi, cosine]", "evaluation.similarities.1: got 'cosine'"),
    ("evaluation.sentence_model=''", "evaluation.sentence_model: got ''"),
    ("dnd.layers=[]", "dnd.layers: got []"),
    ("dnd.top_k=0", "dnd.top_k: got 0"),
    ("dnd.crops.size=0", "dnd.crops.size: got 0"),
    ("dnd.crops.max_per_image=-1", "dnd.crops.max_per_image: got -1"),
    ("dnd.crops.iou_max=1.5", "dnd.crops.iou_max: got 1.5; expected a number from 0 to 1"),
    ("dnd.crops.image_iou_max=-0.1", "dnd.crops.image_iou_max: got -0.1"),
    ("captioner.name=blib", "captioner.name: got 'blib'"),
    ("captioner.model=3", "captioner.model: got 3"),
    ("captioner.checkpoint=[a]", "captioner.checkpoint: got ['a']"),
    ("captioner.max_new_tokens=0", "captioner.max_new_tokens: got 0"),
    ("captioner.batch_size=0", "captioner.batch_size: got 0"),
    ("llm.name=gpt", "llm.name: got 'gpt'"),
    ("llm.model=1", "llm.model: got 1"),
    ("llm.temperature=-0.5", "llm.temperature: got -0.5; expected a number >= 0"),
    ("llm.max_new_tokens=0", "llm.max_new_tokens: got 0"),
    ("llm.summaries=0", "llm.summaries: got 0"),
    ("llm.prompts=v9", "llm.prompts: got 'v9'"),
    ("llm.mode=play", "llm.mode: got 'play'; expected live or replay"),
    ("llm.guards=loose", "llm.guards: got 'loose'; expected reference"),
    ("synthesis.name=retreive", "synthesis.name: got 'retreive'"),
    ("synthesis.model=5", "synthesis.model: got 5"),
    ("synthesis.prompt='an image'", "synthesis.prompt: got 'an image'; expected text with {"),
    ("synthesis.prompt='{concept} {x}'", "synthesis.prompt: got '{concept} {x}'"),
    ("synthesis.images_per_concept=0", "synthesis.images_per_concept: got 0"),
    ("synthesis.steps=0", "synthesis.steps: got 0"),
    ("synthesis.scheduler=ddim", "synthesis.scheduler: got 'ddim'; expected dpm-multistep or"),
    ("synthesis.guidance_scale=-1", "synthesis.guidance_scale: got -1"),
    ("synthesis.height=500", "synthesis.height: got 500; expected null"),
    ("synthesis.width=0", "synthesis.width: got 0"),
    ("synthesis.batch_size=0", "synthesis.batch_size: got 0"),
    ("synthesis.pool=[]", "synthesis.pool: got []"),
    ("selection.scoring=best", "selection.scoring: got 'best'"),
    ("selection.beta=0", "selection.beta: got 0"),
    ("selection.zeta=0", "selection.zeta: got 0"),
    ("selection.labels=0", "selection.labels: got 0"),
    ("quality.probe_sets=[]", "quality.probe_sets: got []"),
    ("quality.split.select=2", "quality.split.select: got 2"),
    ("quality.split.pool=-0.1", "quality.split.pool: got -0.1"),
    ("quality.split.calibrate=abc", "quality.split.calibrate: got 'abc'"),
    ("quality.split.test=1.5", "quality.split.test: got 1.5"),
    ("quality.cosy_prompt='a photo'", "quality.cosy_prompt: got 'a photo'; expected text with {"),
    ("quality.cosy_images=0", "quality.cosy_images: got 0"),
    ("quality.bootstrap=0", "quality.bootstrap: got 0"),
    ("trust.heldout=1", "trust.heldout: got 1; expected a fraction strictly between 0 and 1"),
    ("trust.null_concepts=5", "trust.null_concepts: got 5; expected a whole number >= 10"),
    ("trust.alpha=0", "trust.alpha: got 0"),
    ("trust.cosy=maybe", "trust.cosy: got 'maybe'; expected true or false"),
    ("trust.cosy_images=0", "trust.cosy_images: got 0"),
    ("executor.name=spark", "executor.name: got 'spark'; expected an executor: one of local, ray"),
    ("executor.address=6379", "executor.address: got 6379"),
    ("executor.num_cpus=0", "executor.num_cpus: got 0"),
    ("executor.gpus_per_task=-1", "executor.gpus_per_task: got -1"),
    ("executor.max_retries=-1", "executor.max_retries: got -1"),
    ("executor.threads=0", "executor.threads: got 0"),
]


@pytest.mark.parametrize("override,first_line", OTHER_BAD, ids=[o for o, _ in OTHER_BAD])
def test_every_key_has_a_type_range_or_choices(override, first_line):
    msg = error_of([override])
    lines = msg.splitlines()
    assert lines[0].startswith(first_line) and "; expected " in lines[0], msg
    assert len(lines) == 2 and "--set key=value" in lines[1]


def test_every_profile_key_is_covered_by_a_bad_value_test():
    tested = {o.split("=", 1)[0] for o, _ in OTHER_BAD}
    tested |= {"probe.limit", "activations.top_k", "activations.chunk_size", "dnd.neurons",
               "target.layers", "device"}
    keys = nd.load_config("offline").keys()
    leaves = {k for k in keys if not any(o.startswith(k + ".") for o in keys)
              and not k.startswith(("probe.sets.", "evaluation.probe_sets.", "synthesis.pool.",
                                    "quality.probe_sets.", "dnd.neurons."))}
    assert leaves and leaves <= tested, sorted(leaves - tested)


def test_choices_come_from_the_registries():
    assert "one of mean, topk-sq-mean, image-products, topk-compare" in error_of(
        ["selection.scoring=best"])
    msg = error_of(["clip_dissect.similarity=soft_wmpi"])
    assert ", ".join(list_similarities()) in msg and "(closest: soft_wpmi)" in msg
    assert "one of blip, classifier" in error_of(["captioner.name=blib"])
    assert "one of keywords, openai, transformers" in error_of(["llm.name=gpt"])


def test_cross_key_rules():
    msg = error_of(["clip_dissect.hyperparameters={topk: 5}"])
    assert "a keyword of soft_wpmi" in msg and "top_k" in msg
    nd.load_config("offline", ["clip_dissect.hyperparameters={top_k: 50}"])
    # the keywords follow the chosen function
    assert "clip_dissect.hyperparameters.top_k" in error_of(
        ["clip_dissect.similarity=cos_similarity", "clip_dissect.hyperparameters={top_k: 50}"])
    assert error_of(["synthesis.name=diffusers"]).startswith("synthesis.model: got null")
    nd.load_config("paper")  # diffusers with a model


def test_every_problem_is_listed_once_per_line():
    msg = error_of(["probe.limit=abc", "device=tpu", "llm.mode=play"])
    lines = msg.splitlines()
    assert [ln.split(":")[0] for ln in lines[:3]] == ["device", "probe.limit", "llm.mode"]
    assert lines[3].startswith("(3 invalid config value(s) in ") and str(CONFIG_DIR) in lines[3]


def test_yaml_files_and_mappings_are_validated_too(tmp_path):
    data = yaml.safe_load((CONFIG_DIR / "offline.yaml").read_text())
    data["activations"]["topk"] = 5
    data["llm"]["mode"] = "replay"
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(nd.ConfigError) as err:
        nd.load_config(path)
    assert str(err.value).startswith("activations.topk: unknown key (value 5); expected no such "
                                     "key: remove it, or did you mean top_k")
    del data["activations"]["topk"]
    data["selection"]["labels"] = "three"
    with pytest.raises(nd.ConfigError, match=r"^selection.labels: got 'three'; expected a whole"):
        nd.load_config(data)
    # an absent key is not a validation error (run folders saved before a key was added stay
    # readable); the stage reading it gets a ConfigError naming it
    del data["selection"]["labels"]
    cfg = nd.load_config(data)
    assert cfg["llm.mode"] == "replay"
    with pytest.raises(nd.ConfigError, match="'selection.labels' does not exist"):
        cfg["selection.labels"]


def test_overrides_skip_nothing_on_a_loaded_config():
    # a Config passed back in is validated again after its new overrides
    cfg = nd.load_config("offline")
    with pytest.raises(nd.ConfigError, match="^activations.top_k: got 0"):
        nd.load_config(cfg, ["activations.top_k=0"])


# ------------------------------------------------------------------ check_data_dir
FIX = ("--set data_dir=/some/writable/folder", "ND_DATA_DIR")


def test_check_data_dir_creates_and_accepts_a_writable_folder(tmp_path):
    assert check_data_dir(tmp_path / "new" / "store") == tmp_path / "new" / "store"
    assert (tmp_path / "new" / "store").is_dir()
    assert list((tmp_path / "new" / "store").iterdir()) == []  # the probe file is removed
    cfg = nd.load_config("offline", [f"data_dir={tmp_path / 'cfgstore'}"])
    assert check_data_dir(cfg) == tmp_path / "cfgstore" and cfg.data_dir.is_dir()


def test_check_data_dir_rejects_a_file(tmp_path):
    path = tmp_path / "a-file"
    path.write_text("x")
    cfg = nd.load_config("offline", [f"data_dir={path}"])  # load_config does not check it
    with pytest.raises(nd.ConfigError) as err:
        check_data_dir(cfg)
    msg = str(err.value)
    assert str(path) in msg and "not a directory" in msg and all(f in msg for f in FIX)


def test_check_data_dir_rejects_a_folder_it_cannot_create(tmp_path):
    (tmp_path / "a-file").write_text("x")
    path = tmp_path / "a-file" / "store"
    with pytest.raises(nd.ConfigError) as err:
        check_data_dir(str(path))
    msg = str(err.value)
    assert str(path) in msg and "not writable" in msg and all(f in msg for f in FIX)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="root writes to read-only folders")
def test_check_data_dir_rejects_a_read_only_folder(tmp_path):
    path = tmp_path / "ro"
    path.mkdir()
    path.chmod(0o500)
    try:
        with pytest.raises(nd.ConfigError, match="not writable"):
            check_data_dir(path)
    finally:
        path.chmod(0o700)
