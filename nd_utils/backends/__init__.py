"""The models the pipeline runs, one registry per family (`nd_utils.registry.Registry`).

| family | module | list / load / add |
|---|---|---|
| target networks | `targets` (the type: `target_network`) | `list_targets`, `load_target`, `register_target`, `from_module` (`target_network`) |
| vision-language models | `vlm` | `list_vlms`, `load_vlm`, `register_vlm` |
| captioners | `captioners` | `list_captioners`, `load_captioner`, `register_captioner` |
| language models | `language_models` (+ `openai_backend`, `gguf_parts`; prompts in `prompt_templates`, answers cached by `answer_cache`) | `list_language_models`, `load_language_model`, `register_language_model` |
| concept-image synthesizers | `synthesizers` | `list_synthesizers`, `load_synthesizer`, `register_synthesizer` |
| sentence embeddings | `sentence_models`, `sentence_encoders` | `load_sentence_model`, `load_sentence_encoder` |

A loaded backend carries its preprocessing and an id for cache keys (`weights_id`,
`backend_id`, `model_id`). `configured` builds each family's backend from a config
(`load_vlm_from_config`, ...), so no stage imports another stage to get a model. Nothing is
imported here: `nd_utils.backends.vlm` loads open_clip only when an open_clip model is asked for.
"""
