// Neuron cards of the static run report: filter, search, sort, paginate; plain DOM, no network.
// Every string from the data goes through textContent or setAttribute, never innerHTML,
// because labels come from concept lists and models and may contain markup.
(function () {
  "use strict";
  var DATA = JSON.parse(document.getElementById("nd-data").textContent);
  var PAGE = DATA.pageSize || 60;
  var neurons = DATA.neurons, layers = DATA.layers, images = DATA.images;
  var state = { layer: "", query: "", sort: "unit", page: 0, trusted: false };
  var shown = neurons;

  function $(id) { return document.getElementById(id); }
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function fmt(x) { return x === null || x === undefined ? "n/a" : Number(x).toFixed(3); }
  function img(idx, title, cls) {
    var src = images[idx];
    if (!src) return null;  // thumbnail could not be made (file gone); skip it
    var i = el("img", cls);
    i.setAttribute("loading", "lazy");
    i.setAttribute("src", src);
    i.setAttribute("alt", title);
    i.setAttribute("title", title);
    return i;
  }

  // Lower-cased label text of both methods, computed once, so typing stays fast at 5,000 cards.
  neurons.forEach(function (n) {
    var parts = [n.c || ""];
    (n.cc || []).forEach(function (x) { parts.push(x[0]); });
    (n.d || []).forEach(function (x) { parts.push(x); });
    (n.k || []).forEach(function (x) { parts.push(x[0]); });
    if (n.tc && n.tc[5]) parts.push(n.tc[5]);  // the label the trust score judges
    n.q = parts.join("\n").toLowerCase();
  });

  function card(n) {
    var c = el("article", "card");
    c.setAttribute("data-layer", layers[n.l]);
    c.setAttribute("data-unit", n.u);
    var h = el("h3");
    h.appendChild(el("span", "layer", layers[n.l]));
    h.appendChild(el("span", "unit", "unit " + n.u));
    c.appendChild(h);
    var strip = el("div", "imgs");
    (n.t || []).forEach(function (t) {
      var i = img(t[0], "activation " + fmt(t[1]));
      if (!i) return;
      var f = el("figure");
      f.appendChild(i);
      f.appendChild(el("figcaption", "", fmt(t[1])));
      strip.appendChild(f);
    });
    if (!strip.childNodes.length) strip.appendChild(el("span", "absent", "no top images"));
    c.appendChild(strip);

    var cd = el("section", "method cd");
    cd.appendChild(el("h4", "", "CLIP-Dissect"));
    if (n.c === null || n.c === undefined) {
      cd.appendChild(el("div", "absent", "no CLIP-Dissect label"));
    } else {
      var lab = el("div", "label", n.c);
      lab.appendChild(el("span", "score", fmt(n.s)));
      cd.appendChild(lab);
      if (n.tc) {  // right under the label it judges (or names the one it judges, t[5])
        var t = n.tc, verdict = t[2] === null ? "" :  // untested (no q): no verdict
          " · " + (t[4] ? "\u2713 trusted" : "not trusted") + " (q = " + sig(t[2]) + ")";
        cd.appendChild(el("div", "trust" + (t[4] ? " trusted" : ""),
          (t[5] ? "\u201c" + t[5] + "\u201d: " : "") + trustText(t[0], t[1], t[3]) + verdict));
        if (t[4]) c.classList.add("trusted");
      }
      var top = (n.cc || []).map(function (x) { return x[0] + " " + fmt(x[1]); });
      if (top.length) cd.appendChild(el("div", "concepts", top.join(" · ")));
    }
    c.appendChild(cd);

    var dnd = el("section", "method dnd");
    dnd.appendChild(el("h4", "", "Describe-and-Dissect"));
    if (!n.d || !n.d.length) {
      dnd.appendChild(el("div", "absent", DATA.hasDnd ? "no DnD label" : "no DnD results"));
    } else {
      var dl = el("div", "label", n.d[0]);
      if (n.ds !== null && n.ds !== undefined) dl.appendChild(el("span", "score", fmt(n.ds)));
      dnd.appendChild(dl);
      if (n.td) dnd.appendChild(el("div", "trust", trustText(n.td[0], n.td[1], n.td[2])));
      if (n.d.length > 1) {
        dnd.appendChild(el("div", "concepts", "also: " + n.d.slice(1).join(" · ")));
      }
    }
    if (n.x && n.x.length) {  // D_top: the crops and originals DnD captioned
      var xs = el("div", "imgs dtop");
      xs.appendChild(el("span", "tag", "D_top"));
      n.x.forEach(function (x) {
        var i = img(x[0], x[2] + " · activation " + fmt(x[1]));
        if (i) xs.appendChild(i);
      });
      dnd.appendChild(xs);
    }
    (n.k || []).forEach(function (k) {  // candidate labels, best first, with their images
      var row = el("div", "cand");
      row.appendChild(el("span", "name", k[0] + " " + fmt(k[1])));
      (k[2] || []).forEach(function (idx) {
        var i = img(idx, k[0]);
        if (i) row.appendChild(i);
      });
      dnd.appendChild(row);
    });
    c.appendChild(dnd);
    var q = quality(n);
    if (q) c.appendChild(q);
    return c;
  }

  // Stage 08's scores of both labels on one line: CoSy AUC, MAD and simulation r.
  function quality(n) {
    var parts = [["CLIP-Dissect", n.qc], ["DnD", n.qd]].filter(function (m) { return m[1]; });
    if (!parts.length) return null;
    var line = el("div", "quality");
    line.appendChild(el("span", "tag", "held-out label quality "));  // the space keeps copied text apart
    line.appendChild(document.createTextNode(parts.map(function (m) {
      var q = m[1];
      var label = q[3] ? " \u201c" + q[3] + "\u201d" : "";  // judged label (select split)
      return m[0] + label + ": AUC " + fmt(q[0]) + " · MAD " + fmt(q[1]) + " · sim r " + fmt(q[2]);
    }).join(" | ")));
    return line;
  }

  // A label's held-out score, in the words of nd_utils.viz.trust_plots.trust_text.
  function sig(x) {  // 3 significant digits, no trailing zeros: like Python's format(x, ".3g")
    return x === null || x === undefined ? "n/a" : String(Number(Number(x).toPrecision(3)));
  }
  function trustText(r, p, auc) {
    return "held-out r = " + (r === null ? "n/a" : Number(r).toFixed(2)) + ", p = " + sig(p) +
      ", AUC " + (auc === null ? "n/a" : Number(auc).toFixed(2));
  }
  function trustValue(i) { return function (n) { return n.tc ? n.tc[i] : null; }; }

  function score(n, key) {
    var v = typeof key === "function" ? key(n) : n[key];
    return v === null || v === undefined ? NaN : v;
  }
  function sorter(key, dir) {
    return function (a, b) {
      var x = score(a, key), y = score(b, key);
      if (isNaN(x) !== isNaN(y)) return isNaN(x) ? 1 : -1;  // missing scores last
      return (dir * (x - y)) || (a.l - b.l) || (a.u - b.u);
    };
  }
  // Most trusted first: lowest q, then highest r (what RunView users get from rank_by_trust).
  function byTrust(a, b) {
    var x = score(a, trustValue(2)), y = score(b, trustValue(2));
    if (isNaN(x) !== isNaN(y)) return isNaN(x) ? 1 : -1;  // unscored labels last
    if (!isNaN(x) && x !== y) return x - y;
    return sorter(trustValue(0), -1)(a, b);
  }

  function apply() {
    var q = state.query.trim().toLowerCase(), li = layers.indexOf(state.layer);
    shown = neurons.filter(function (n) {
      return (li < 0 || n.l === li) && (!q || n.q.indexOf(q) >= 0) &&
        (!state.trusted || (n.tc && n.tc[4] === 1));
    });
    if (state.sort === "cd-desc") shown.sort(sorter("s", -1));
    else if (state.sort === "cd-asc") shown.sort(sorter("s", 1));
    else if (state.sort === "dnd-desc") shown.sort(sorter("ds", -1));
    else if (state.sort === "trust") shown.sort(byTrust);
    else if (state.sort === "r-desc") shown.sort(sorter(trustValue(0), -1));
    state.page = 0;
    render();
  }

  function render() {
    var pages = Math.max(1, Math.ceil(shown.length / PAGE));
    state.page = Math.min(Math.max(0, state.page), pages - 1);
    var start = state.page * PAGE, slice = shown.slice(start, start + PAGE);
    var frag = document.createDocumentFragment();
    slice.forEach(function (n) { frag.appendChild(card(n)); });
    var box = $("cards");
    box.replaceChildren(frag);
    var end = start + slice.length;
    $("count").textContent = shown.length
      ? "showing " + (start + 1) + "–" + end + " of " + shown.length + " neurons"
      : "no neuron matches";
    $("page").textContent = "page " + (state.page + 1) + " of " + pages;
    $("first").disabled = $("prev").disabled = state.page === 0;
    $("next").disabled = $("last").disabled = state.page >= pages - 1;
  }

  // 02_trust_summary.csv as a small table above the cards (nothing for older runs).
  function trustSummary() {
    var rows = DATA.trust || [];
    if (!rows.length) return;
    var t = el("table", "trust-table"), head = el("tr");
    ["layer", "trusted", "fraction", "median held-out r", "mean CoSy AUC", "label agreement",
     "alpha"].forEach(function (h) { head.appendChild(el("th", "", h)); });
    t.appendChild(head);
    rows.forEach(function (s) {
      var tr = el("tr");
      [s.layer, (s.trusted === null ? "n/a" : s.trusted) + " of " + (s.n === null ? "n/a" : s.n),
       fmt(s.fraction), fmt(s.r), fmt(s.auc), fmt(s.agree), sig(s.alpha)]
        .forEach(function (v) { tr.appendChild(el("td", "", v)); });
      t.appendChild(tr);
    });
    var box = $("trust-summary");
    box.appendChild(el("h2", "", "Label trust per layer (stage 02, held-out probe half)"));
    box.appendChild(t);
  }

  function go(page) { state.page = page; render(); window.scrollTo(0, 0); }

  var sel = $("layer");
  layers.forEach(function (name) {
    var o = el("option", "", name);
    o.value = name;
    sel.appendChild(o);
  });
  var notes = $("notices");
  (DATA.missing || []).forEach(function (m) { notes.appendChild(el("li", "", m)); });
  $("run-meta").textContent = DATA.meta || "";
  trustSummary();
  if (DATA.hasTrust) {
    $("trust-filter").hidden = false;
  } else {  // an older run: its labels have no trust score to sort or filter by
    Array.prototype.slice.call(document.querySelectorAll("option[data-trust]"))
      .forEach(function (o) { o.remove(); });
  }

  var timer = null;
  $("search").addEventListener("input", function (e) {
    clearTimeout(timer);
    timer = setTimeout(function () { state.query = e.target.value; apply(); }, 120);
  });
  sel.addEventListener("change", function (e) { state.layer = e.target.value; apply(); });
  $("sort").addEventListener("change", function (e) { state.sort = e.target.value; apply(); });
  $("trusted").addEventListener("change", function (e) {
    state.trusted = e.target.checked;
    apply();
  });
  $("first").addEventListener("click", function () { go(0); });
  $("prev").addEventListener("click", function () { go(state.page - 1); });
  $("next").addEventListener("click", function () { go(state.page + 1); });
  $("last").addEventListener("click", function () { go(Infinity); });
  apply();
  document.body.setAttribute("data-ready", "1");  // lets browser tests wait for the first render
})();
