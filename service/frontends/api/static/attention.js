/* SeedNet attention explorer: upload an image, show the prediction and per-block attention.
 *
 * Plain JS, no dependencies, nothing fetched from outside the service. Configuration comes
 * from data-* attributes on <main id="app"> (see attention.html).
 *
 * DOM contract used by tests and other tools:
 *   #app[data-state]               idle | busy | ready | error
 *   #file-input, #drop-zone        upload controls
 *   #error[role=alert]             API / client error message (textContent is the message only)
 *   #model-input                   32x32 model input, shown enlarged (pixelated)
 *   #original-preview              the uploaded file as the browser decodes it
 *   #predicted-label, #confidence  label text exactly as in the JSON; "93.1 %"
 *   #probabilities-chart > [data-class][data-value]   one row per class, sorted desc,
 *                                                     predicted row has data-predicted="true"
 *   #attention-chart [data-block]  one group per block; inside, .att-bar[data-weight]
 *                                  per branch (and .att-ghost[data-typical] when the
 *                                  reference is available; group gets data-unusual="true")
 *
 * Explanations (POST /explain, when the server has them on):
 *   #app[data-explain-state]       idle | busy | ready | error | off
 *   #app[data-explain-target]      the class index the maps explain
 *   #app[data-explain-block]       the map shown: "block-N" or "macro-M"
 *   #explain-class                 <select>, option value = class index
 *   #explain-block-options input[name=explain-block]   one radio per map (value as above)
 *   #overlay-original, #overlay-input   the chosen map (PNG data URL) over each image
 *   #explain-show, #explain-opacity     show / hide the heat maps, their opacity
 *   #attention-chart [data-block] .branch-map[data-branch] img.heat-overlay
 *                                  where each branch's weighted output is strong
 *   #attention-chart [data-block] .att-share[data-shares]   gradient-weighted shares (JSON)
 *   #explain-error[role=alert]     the explanation's error (the prediction stays)
 */
(function () {
  "use strict";

  var UNUSUAL_THRESHOLD = 0.15;
  var REFERENCE_TIMEOUT_MS = 8000;

  var app = document.getElementById("app");
  if (!app) return;

  var cfg = {
    predictUrl: app.dataset.predictUrl || "/predict",
    referenceUrl: app.dataset.referenceUrl || "/attention/reference",
    maxBytes: parseInt(app.dataset.maxUploadBytes, 10) || 0,
    classes: parseJson(app.dataset.classes, []),
    explainUrl: app.dataset.explainUrl || "/explain",
    explainEnabled: app.dataset.explainEnabled === "true",
  };

  var el = {
    input: byId("file-input"),
    dropZone: byId("drop-zone"),
    status: byId("status"),
    error: byId("error"),
    results: byId("results"),
    original: byId("original-preview"),
    originalCaption: byId("original-caption"),
    modelInput: byId("model-input"),
    label: byId("predicted-label"),
    confidence: byId("confidence"),
    runnerUp: byId("runner-up"),
    oodNotice: byId("ood-notice"),
    probChart: byId("probabilities-chart"),
    attChart: byId("attention-chart"),
    attLegend: byId("attention-legend"),
    attSummary: byId("attention-summary"),
    originalFrame: byId("original-frame"),
    overlayOriginal: byId("overlay-original"),
    overlayInput: byId("overlay-input"),
    explainPanel: byId("explain-panel"),
    explainStatus: byId("explain-status"),
    explainClass: byId("explain-class"),
    explainShow: byId("explain-show"),
    explainOpacity: byId("explain-opacity"),
    explainBlocks: byId("explain-blocks"),
    explainOptions: byId("explain-block-options"),
    explainCaption: byId("explain-caption"),
    explainError: byId("explain-error"),
    explainErrorText: byId("explain-error-text"),
    explainRetry: byId("explain-retry"),
  };

  var currentRequest = null; // AbortController of the upload in flight
  var requestSeq = 0;
  var previewUrl = null;
  var referencePromise = null;

  // Explanations: the file and prediction they belong to, the answer, the map shown.
  var explain = {
    file: null,
    predicted: null,     // class index the model predicts for the file
    modelInput: null,    // the 32x32 input (data URL) the thumbnails are drawn on
    request: null,       // AbortController of the explanation in flight
    seq: 0,
    result: null,        // explanations[0] of the last answer
    selected: null,      // "block-N" | "macro-M"
    target: null,        // class asked for (null: the predicted one)
  };

  // ---------------------------------------------------------------- helpers

  function byId(id) { return document.getElementById(id); }

  function parseJson(text, fallback) {
    try { return JSON.parse(text); } catch (e) { return fallback; }
  }

  function h(tag, attrs, children) {
    var node = document.createElement(tag);
    if (attrs) {
      Object.keys(attrs).forEach(function (k) {
        var v = attrs[k];
        if (v === null || v === undefined || v === false) return;
        if (k === "className") node.className = v;
        else if (k === "text") node.textContent = v;
        else if (k === "style") Object.assign(node.style, v);
        else node.setAttribute(k, v === true ? "" : String(v));
      });
    }
    (children || []).forEach(function (c) {
      if (c === null || c === undefined) return;
      node.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    });
    return node;
  }

  function isNum(x) { return typeof x === "number" && isFinite(x); }
  function clamp01(x) { return Math.max(0, Math.min(1, x)); }
  function pctWidth(x) { return (clamp01(x) * 100).toFixed(2) + "%"; }

  function formatPercent(p) {
    if (!isNum(p)) return "–";
    if (p > 0 && p < 0.0005) return "<0.1 %";
    return (p * 100).toFixed(1) + " %";
  }

  function formatWeight(w) { return isNum(w) ? w.toFixed(2) : "–"; }

  function formatSigned(d) { return (d >= 0 ? "+" : "−") + Math.abs(d).toFixed(2); }

  function formatMiB(n) { return (n / (1024 * 1024)).toFixed(1) + " MiB"; }

  function setState(state) {
    app.dataset.state = state;
    if (state === "busy") {
      app.setAttribute("aria-busy", "true");
    } else {
      app.removeAttribute("aria-busy");
    }
  }

  function setStatus(text) { el.status.textContent = text || ""; }

  function showError(message, code) {
    el.error.textContent = message;
    if (code) el.error.dataset.code = code; else delete el.error.dataset.code;
    el.error.hidden = false;
    el.results.hidden = true;
    app.classList.remove("has-results");
    setState("error");
    setStatus("");
  }

  function clearError() {
    el.error.hidden = true;
    el.error.textContent = "";
  }

  // ---------------------------------------------------------------- reference data

  function loadReference() {
    if (referencePromise) return referencePromise;
    var ctrl = new AbortController();
    var timer = setTimeout(function () { ctrl.abort(); }, REFERENCE_TIMEOUT_MS);
    referencePromise = fetch(cfg.referenceUrl, {
      headers: { Accept: "application/json" },
      signal: ctrl.signal,
    })
      .then(function (resp) {
        if (resp.status === 404) return null; // this model version has no reference data
        if (!resp.ok) throw new Error("HTTP " + resp.status);
        return resp.json();
      })
      .catch(function () {
        referencePromise = null; // transient failure: try again with the next upload
        return null;
      })
      .finally(function () { clearTimeout(timer); });
    return referencePromise;
  }

  function validRows(rows, blocks) {
    return Array.isArray(rows) && rows.length >= blocks && rows.every(function (r) {
      return Array.isArray(r) && r.every(isNum);
    });
  }

  /** The typical attention to compare with: {rows, label} or null. */
  function typicalFor(ref, label, modelInfo, blocks) {
    if (!ref || typeof ref !== "object") return null;
    // Only compare with statistics of the same model version.
    if (ref.model && modelInfo && ref.model.version !== undefined &&
        modelInfo.version !== undefined && String(ref.model.version) !== String(modelInfo.version)) {
      return null;
    }
    var byPred = ref.by_predicted_class || {};
    if (validRows(byPred[label], blocks)) {
      return { rows: byPred[label], label: "typical " + label, what: "typical " + label + " images" };
    }
    if (validRows(ref.overall, blocks)) {
      return { rows: ref.overall, label: "typical (all test images)", what: "all test images" };
    }
    return null;
  }

  // ---------------------------------------------------------------- upload

  function handleFiles(files) {
    if (!files || !files.length) return;
    upload(files[0]);
  }

  function upload(file) {
    clearError();
    if (cfg.maxBytes && file.size > cfg.maxBytes) {
      showError("the file is " + formatMiB(file.size) + "; the limit is " + formatMiB(cfg.maxBytes),
        "file_too_large");
      return;
    }
    if (file.size === 0) {
      showError("the file is empty", "empty_file");
      return;
    }

    if (currentRequest) currentRequest.abort();
    resetExplanations();
    var ctrl = new AbortController();
    currentRequest = ctrl;
    var seq = ++requestSeq;

    setState("busy");
    setStatus("Classifying " + (file.name || "image") + "…");

    var url = new URL(cfg.predictUrl, window.location.href);
    url.searchParams.set("top_k", "3");
    url.searchParams.set("include_input", "true");

    var refP = loadReference();

    postFile(url, file, ctrl.signal, "predictions", "The service returned an unexpected answer.")
      .then(function (data) {
        return refP.then(function (ref) { return { data: data, ref: ref }; });
      })
      .then(function (res) {
        if (seq !== requestSeq) return; // a newer upload superseded this one
        render(res.data, res.ref, file);
      })
      .catch(function (err) {
        if (seq !== requestSeq || (err && err.name === "AbortError")) return;
        if (err instanceof ApiError) showError(err.message, err.code);
        else showError("Could not reach the service. Check your connection and try again.", "network");
      })
      .finally(function () {
        if (seq === requestSeq) currentRequest = null;
      });
  }

  /** POST ``file`` as multipart to ``url``; the JSON answer, whose ``listKey`` must be a
   *  non-empty array, or an ApiError (with the server's message, code and Retry-After). */
  function postFile(url, file, signal, listKey, unexpected) {
    var body = new FormData();
    body.append("file", file, file.name || "upload");
    return fetch(url.toString(), {
      method: "POST",
      body: body,
      headers: { Accept: "application/json" },
      signal: signal,
    }).then(function (resp) {
      return resp.text().then(function (text) {
        var data = parseJson(text, null);
        if (!resp.ok) {
          var err = new ApiError(errorMessage(resp, data), data && data.error && data.error.code);
          err.retryAfter = parseInt(resp.headers.get("Retry-After"), 10) || null;
          throw err;
        }
        if (!data || !Array.isArray(data[listKey]) || !data[listKey].length) {
          throw new ApiError(unexpected);
        }
        return data;
      });
    });
  }

  function ApiError(message, code) { this.name = "ApiError"; this.message = message; this.code = code; }
  ApiError.prototype = Object.create(Error.prototype);

  function errorMessage(resp, data) {
    if (data && data.error && typeof data.error.message === "string" && data.error.message) {
      return data.error.message;
    }
    if (data && typeof data.detail === "string") return data.detail;
    if (data && Array.isArray(data.detail) && data.detail.length && data.detail[0].msg) {
      return data.detail[0].msg;
    }
    return "The service answered " + resp.status + (resp.statusText ? " " + resp.statusText : "") + ".";
  }

  /** Show the upload itself; called with the result so that all panels show the same file. */
  function showPreview(file) {
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = URL.createObjectURL(file);
    el.original.hidden = false;
    el.original.classList.remove("pixelated");
    el.original.onerror = function () {
      el.original.hidden = true; // e.g. a format the browser cannot display
    };
    el.original.onload = function () {
      // Tiny originals (e.g. CIFAR's own 32x32 images): show the pixels, not a blur.
      if (el.original.naturalWidth && el.original.naturalWidth <= 128 && el.original.naturalHeight <= 128) {
        el.original.classList.add("pixelated");
      }
    };
    el.original.src = previewUrl;
    el.original.alt = "Your upload: " + (file.name || "image");
  }

  // ---------------------------------------------------------------- rendering

  function render(data, ref, file) {
    var pred = data.predictions[0];
    var model = data.model || {};
    updateModelHeader(model);

    // Input images
    showPreview(file);
    var size = Array.isArray(pred.original_size) ? pred.original_size : null;
    el.originalCaption.textContent = "Your upload" +
      (pred.filename || file.name ? ": " + (pred.filename || file.name) : "") +
      (size ? " (" + size[0] + " × " + size[1] + " px)" : "");
    if (pred.model_input) {
      el.modelInput.src = pred.model_input;
      el.modelInput.alt = "The image resized to 32 × 32 pixels as the model sees it, enlarged";
      el.modelInput.hidden = false;
    } else {
      el.modelInput.removeAttribute("src");
      el.modelInput.hidden = true;
    }

    // Verdict
    el.label.textContent = pred.label;
    el.confidence.textContent = formatPercent(pred.confidence);
    el.confidence.setAttribute("aria-label", "confidence " + formatPercent(pred.confidence));
    var others = (pred.top_k || []).filter(function (t) { return t.label !== pred.label; });
    el.runnerUp.textContent = others.length
      ? "Next: " + others.map(function (t) { return t.label + " " + formatPercent(t.probability); }).join(", ")
      : "";
    // A calibrated version flags inputs unlike its training images (docs/calibration.md).
    if (el.oodNotice) el.oodNotice.hidden = pred.out_of_distribution !== true;

    renderProbabilities(pred);
    var blocks = Array.isArray(pred.attention) ? pred.attention.length : 0;
    explain.modelInput = pred.model_input || null;
    renderAttention(pred, typicalFor(ref, pred.label, model, blocks));
    if (cfg.explainEnabled && el.explainPanel) beginExplanations(file, pred);

    el.results.hidden = false;
    app.classList.add("has-results");
    setState("ready");
    setStatus("Prediction: " + pred.label + " (" + formatPercent(pred.confidence) + ").");

    var top = el.results.getBoundingClientRect().top;
    if (top > window.innerHeight * 0.75 && el.results.scrollIntoView) {
      el.results.scrollIntoView({ behavior: "smooth", block: "start" });
    }
  }

  function updateModelHeader(model) {
    ["name", "version", "backend", "device"].forEach(function (k) {
      var node = byId("model-" + k);
      if (node && model[k] !== undefined && model[k] !== null) node.textContent = String(model[k]);
    });
  }

  function renderProbabilities(pred) {
    var probs = pred.probabilities || {};
    if (!Object.keys(probs).length && Array.isArray(pred.top_k)) {
      pred.top_k.forEach(function (t) { probs[t.label] = t.probability; });
    }
    var order = cfg.classes.slice();
    Object.keys(probs).forEach(function (c) { if (order.indexOf(c) < 0) order.push(c); });
    var rows = order
      .filter(function (c) { return isNum(probs[c]); })
      .map(function (c, i) { return { label: c, p: probs[c], i: i }; })
      .sort(function (a, b) { return b.p - a.p || a.i - b.i; });

    var frag = document.createDocumentFragment();
    var fills = [];
    rows.forEach(function (r) {
      var isTop = r.label === pred.label;
      var fill = h("div", { className: "prob-fill" });
      fills.push([fill, r.p]);
      frag.appendChild(h("li", {
        className: "prob-row" + (isTop ? " is-predicted" : ""),
        "data-class": r.label,
        "data-value": String(r.p),
        "data-predicted": isTop ? "true" : null,
        "aria-current": isTop ? "true" : null,
      }, [
        h("span", { className: "prob-label", text: r.label, title: r.label }),
        h("div", { className: "prob-track", "aria-hidden": "true" }, [fill]),
        h("span", { className: "prob-value", text: formatPercent(r.p) }),
      ]));
    });
    el.probChart.replaceChildren(frag);
    animateWidths(fills);
  }

  function renderAttention(pred, typical) {
    var att = Array.isArray(pred.attention) ? pred.attention : [];
    var frag = document.createDocumentFragment();

    frag.appendChild(h("div", { className: "att-axis", "aria-hidden": "true" }, [
      h("span"),
      h("div", { className: "ticks" }, [
        h("span", { text: "0", style: { left: "0%" } }),
        h("span", { text: "0.5", style: { left: "50%" } }),
        h("span", { text: "1", style: { left: "100%" } }),
      ]),
    ]));

    var unusual = 0;
    var widths = [];
    att.forEach(function (entry, idx) {
      var n = entry && entry.block !== undefined ? entry.block : idx + 1;
      var weights = (entry && Array.isArray(entry.weights)) ? entry.weights : [];
      var typ = typical ? typical.rows[idx] : null;
      if (typ && typ.length !== weights.length) typ = null;

      var labelId = "att-block-" + n + "-label";
      var bars = weights.map(function (w, b) {
        var branch = b + 1;
        var t = typ ? typ[b] : null;
        var bar = h("div", {
          className: "att-bar",
          "data-branch": branch,
          "data-weight": String(w),
        });
        widths.push([bar, w]);
        var trackChildren = [];
        if (t !== null) {
          trackChildren.push(h("div", {
            className: "att-ghost",
            "data-branch": branch,
            "data-typical": String(t),
            style: { width: pctWidth(t) },
          }));
        }
        trackChildren.push(bar);
        if (t !== null) {
          trackChildren.push(h("div", { className: "att-marker", style: { left: pctWidth(t) } }));
        }
        var spoken = "branch " + branch + ": " + formatWeight(w) + " for this image" +
          (t !== null ? ", " + formatWeight(t) + " " + typical.label : "");
        var map = null;
        if (cfg.explainEnabled && el.explainPanel) {
          map = h("span", {
            className: "branch-map thumb is-empty",
            "data-branch": branch,
            role: "img",
            "aria-label": "block " + n + ", branch " + branch + ": where its output is strong (loading)",
          }, [
            explain.modelInput ? h("img", { className: "base", src: explain.modelInput, alt: "" }) : null,
            h("img", { className: "heat-overlay", alt: "" }),
          ]);
        }
        return h("div", { className: "att-bar-row" + (map ? " has-map" : "") }, [
          map,
          h("span", { className: "att-branch-label", text: "branch " + branch }),
          h("div", { className: "att-track", role: "img", "aria-label": spoken }, trackChildren),
          h("span", { className: "att-value", "aria-hidden": "true" }, [
            formatWeight(w),
            t !== null ? h("span", { className: "typ", text: " · typ " + formatWeight(t) }) : null,
          ]),
        ]);
      });

      var hintText = "";
      var isUnusual = false;
      if (typ) {
        var best = -1, bestDiff = 0, maxAbs = 0;
        weights.forEach(function (w, b) {
          var d = w - typ[b];
          maxAbs = Math.max(maxAbs, Math.abs(d));
          if (Math.abs(d) > UNUSUAL_THRESHOLD && (best < 0 || d > bestDiff)) { best = b; bestDiff = d; }
        });
        hintText = "Close to typical (largest difference " + maxAbs.toFixed(2) + ").";
        if (best >= 0) {
          isUnusual = true;
          unusual += 1;
          hintText = "Unusual: branch " + (best + 1) + " gets " + formatWeight(weights[best]) +
            " vs " + formatWeight(typ[best]) + " for " + typical.what +
            " (" + formatSigned(bestDiff) + ").";
        }
      }

      frag.appendChild(h("div", {
        className: "att-block" + (isUnusual ? " is-unusual" : ""),
        role: "group",
        "aria-labelledby": labelId,
        "data-block": n,
        "data-unusual": isUnusual ? "true" : null,
      }, [
        h("div", { className: "att-block-label", id: labelId, text: "block " + n }),
        h("div", { className: "att-bars" }, bars),
        h("p", { className: "att-hint", text: hintText }),
        cfg.explainEnabled && el.explainPanel ? h("p", { className: "att-share" }) : null,
      ]));
    });

    el.attChart.replaceChildren(frag);
    animateWidths(widths);

    // Legend
    var legend = [
      h("li", { id: "legend-this" }, [
        h("span", { className: "swatch branch-1", "aria-hidden": "true" }),
        h("span", { className: "swatch branch-2", "aria-hidden": "true" }),
        "this image",
      ]),
    ];
    if (typical) {
      legend.push(h("li", { id: "legend-typical" }, [
        h("span", { className: "swatch ghost", "aria-hidden": "true" }),
        typical.label,
      ]));
    }
    el.attLegend.replaceChildren.apply(el.attLegend, legend);

    if (!typical) {
      el.attSummary.textContent = "No reference statistics are available for this model version, so there is no comparison.";
    } else if (unusual === 0) {
      el.attSummary.textContent = "Every block is within " + UNUSUAL_THRESHOLD + " of " + typical.what + ".";
    } else {
      el.attSummary.textContent = unusual + " of " + att.length + (att.length === 1 ? " block differs" : " blocks differ") +
        " from " + typical.what + " by more than " + UNUSUAL_THRESHOLD + ".";
    }
  }

  /** Set bar widths on the next frame so that the CSS transition animates them. */
  function animateWidths(pairs) {
    var apply = function () {
      pairs.forEach(function (p) { p[0].style.width = pctWidth(p[1]); });
    };
    if (window.requestAnimationFrame && !document.hidden) {
      requestAnimationFrame(function () { requestAnimationFrame(apply); });
      setTimeout(apply, 100); // in case frames are throttled
    } else {
      apply();
    }
  }

  // ---------------------------------------------------------------- explanations

  function setExplainState(state) {
    app.dataset.explainState = state;
    if (el.explainPanel) el.explainPanel.setAttribute("aria-busy", state === "busy" ? "true" : "false");
  }

  function resetExplanations() {
    if (explain.request) explain.request.abort();
    explain.request = null;
    explain.seq += 1;
    explain.result = null;
    explain.target = null;
    [el.overlayOriginal, el.overlayInput].forEach(function (o) {
      if (!o) return;
      o.hidden = true;
      o.removeAttribute("src");
    });
    if (!el.explainPanel) return;
    el.explainOptions.replaceChildren();
    el.explainCaption.textContent = "";
    el.explainError.hidden = true;
    el.explainStatus.textContent = "";
    delete app.dataset.explainTarget;
    delete app.dataset.explainBlock;
    setExplainState("idle");
  }

  function beginExplanations(file, pred) {
    explain.file = file;
    var probs = pred.probabilities || {};
    explain.predicted = cfg.classes.indexOf(pred.label);
    // The class selector: every class, the predicted one first in meaning, not in order.
    var options = cfg.classes.map(function (c, i) {
      var p = isNum(probs[c]) ? " · " + formatPercent(probs[c]) : "";
      return h("option", {
        value: String(i),
        text: c + p + (i === explain.predicted ? " (predicted)" : ""),
      });
    });
    el.explainClass.replaceChildren.apply(el.explainClass, options);
    el.explainClass.value = String(explain.predicted);
    el.explainClass.disabled = false;
    requestExplanation(null);
  }

  function requestExplanation(target) {
    if (!explain.file) return;
    if (explain.request) explain.request.abort();
    var ctrl = new AbortController();
    explain.request = ctrl;
    var seq = ++explain.seq;
    explain.target = target;

    setExplainState("busy");
    el.explainError.hidden = true;
    el.explainStatus.textContent = "Computing the heat maps…";

    var url = new URL(cfg.explainUrl, window.location.href);
    url.searchParams.set("encoding", "png");
    url.searchParams.set("branch_maps", "strength");
    if (target !== null) url.searchParams.set("class", String(target));
    postFile(url, explain.file, ctrl.signal, "explanations",
      "The service returned an unexpected explanation.")
      .then(function (data) {
        if (seq !== explain.seq) return;
        explain.result = data.explanations[0];
        renderExplanation();
      })
      .catch(function (err) {
        if (seq !== explain.seq || (err && err.name === "AbortError")) return;
        if (err instanceof ApiError && err.code === "explanations_off") {
          setExplainState("off");
          el.explainPanel.hidden = true;
          return;
        }
        var message = err instanceof ApiError ? err.message
          : "Could not reach the service for the heat maps.";
        if (err && err.retryAfter) message += " (try again in " + err.retryAfter + " s)";
        el.explainErrorText.textContent = message;
        el.explainError.hidden = false;
        el.explainStatus.textContent = "";
        setExplainState("error");
      })
      .finally(function () {
        if (seq === explain.seq) explain.request = null;
      });
  }

  /** The maps one can show: blocks in network order, each macro block after its last block. */
  function mapChoices(e) {
    var choices = [];
    var macros = (e.macro_blocks || []).map(function (m, i) {
      return { key: "macro-" + (i + 1), macro: true, blocks: m.blocks, map: m.gradcam,
        name: "blocks " + m.blocks[0] + "–" + m.blocks[m.blocks.length - 1] };
    });
    (e.blocks || []).forEach(function (b) {
      choices.push({ key: "block-" + b.block, macro: false, blocks: [b.block], map: b.gradcam,
        name: "block " + b.block });
      macros.forEach(function (m) {
        if (m.blocks[m.blocks.length - 1] === b.block) choices.push(m);
      });
    });
    return choices;
  }

  function defaultChoice(choices) {
    var macros = choices.filter(function (c) { return c.macro; });
    if (macros.length) return macros[macros.length - 1].key;
    return choices.length ? choices[choices.length - 1].key : null;
  }

  function thumb(src, overlay, label) {
    return h("span", { className: "thumb", role: label ? "img" : null, "aria-label": label || null }, [
      src ? h("img", { className: "base", src: src, alt: "" }) : null,
      overlay ? h("img", { className: "heat-overlay", src: overlay, alt: "" }) : null,
    ]);
  }

  function renderExplanation() {
    var e = explain.result;
    var choices = mapChoices(e);
    if (!choices.some(function (c) { return c.key === explain.selected; })) {
      explain.selected = defaultChoice(choices);
    }
    var lastBlock = choices.filter(function (c) { return !c.macro; }).pop();
    var lastMacro = choices.filter(function (c) { return c.macro; }).pop();

    var tiles = choices.map(function (c) {
      var input = h("input", {
        type: "radio",
        name: "explain-block",
        value: c.key,
        id: "explain-" + c.key,
        checked: c.key === explain.selected,
      });
      input.addEventListener("change", function () { if (input.checked) showChoice(c.key); });
      return h("label", { className: "block-option" + (c.macro ? " is-macro" : ""), "for": input.id }, [
        input,
        h("span", { className: "block-tile" }, [
          thumb(explain.modelInput, c.map && c.map.png, null),
          h("span", { className: "tile-name", text: c.name }),
          c.macro ? h("span", { text: "macro block" }) : null,
        ]),
      ]);
    });
    el.explainOptions.replaceChildren.apply(el.explainOptions, tiles);
    el.explainBlocks.disabled = false;
    el.explainClass.value = String(e.target);

    renderBranchMaps(e);
    explain.choices = choices;
    explain.faithful = [lastBlock && lastBlock.key, lastMacro && lastMacro.key];
    showChoice(explain.selected);

    app.dataset.explainTarget = String(e.target);
    el.explainStatus.textContent = "Heat maps for " + e.label + ".";
    setExplainState("ready");
  }

  function showChoice(key) {
    var e = explain.result;
    if (!e) return;
    var choice = (explain.choices || []).filter(function (c) { return c.key === key; })[0];
    if (!choice) return;
    explain.selected = key;
    app.dataset.explainBlock = key;
    var src = choice.map && choice.map.png;
    [el.overlayOriginal, el.overlayInput].forEach(function (o) {
      if (!o) return;
      if (src) { o.src = src; o.hidden = false; } else { o.hidden = true; }
      o.alt = "Heat map of " + choice.name + " for " + e.label;
    });
    placeOriginalOverlay();

    var faithful = explain.faithful.indexOf(key) >= 0;
    var what = faithful
      ? "where the evidence for " + e.label + " is. The last block and macro block are the maps measured to follow the model's decision."
      : "what this block responds to (edges, colour regions, often the background), not why the model chose " + e.label + ".";
    el.explainCaption.replaceChildren(
      h("span", { className: faithful ? "faithful" : "" }, [
        "Grad-CAM of ", h("strong", { text: choice.name }), " for ", h("strong", { text: e.label }),
        " (" + formatPercent(e.probability) + "): " + what,
      ])
    );
  }

  function renderBranchMaps(e) {
    (e.blocks || []).forEach(function (b) {
      var group = el.attChart.querySelector('[data-block="' + b.block + '"]');
      if (!group) return;
      var shares = [];
      (b.branches || []).forEach(function (br) {
        shares.push(br.gradcam_share);
        var map = group.querySelector('.branch-map[data-branch="' + br.branch + '"]');
        if (!map) return;
        var overlay = map.querySelector("img.heat-overlay");
        if (br.strength && br.strength.png) {
          overlay.src = br.strength.png;
          map.classList.remove("is-empty");
        }
        map.setAttribute("aria-label", "block " + b.block + ", branch " + br.branch +
          ": where its weighted output is strong (" + formatPercent(br.strength_share) + " of the block's output)");
      });
      var share = group.querySelector(".att-share");
      if (!share || !shares.length) return;
      var top = shares.indexOf(Math.max.apply(null, shares));
      share.dataset.shares = JSON.stringify(shares);
      share.replaceChildren(
        "Carries " + e.label + ": ",
        h("span", { className: "carrier", text: "branch " + (top + 1) + " " + formatPercent(shares[top]) }),
        shares.length > 1 ? " · " + shares.map(function (v, i) {
          return i === top ? null : "branch " + (i + 1) + " " + formatPercent(v);
        }).filter(Boolean).join(" · ") : ""
      );
    });
  }

  /** The map covers the upload as the model saw it: the whole image, stretched to square. */
  function placeOriginalOverlay() {
    var o = el.overlayOriginal, img = el.original, frame = el.originalFrame;
    if (!o || !img || !frame || !img.naturalWidth || !img.naturalHeight) return;
    var fw = frame.clientWidth, fh = frame.clientHeight;
    var scale = Math.min(fw / img.naturalWidth, fh / img.naturalHeight);
    var w = img.naturalWidth * scale, h2 = img.naturalHeight * scale;
    o.style.left = ((fw - w) / 2) + "px";
    o.style.top = ((fh - h2) / 2) + "px";
    o.style.width = w + "px";
    o.style.height = h2 + "px";
  }

  if (el.explainPanel) {
    el.explainClass.addEventListener("change", function () {
      var target = parseInt(el.explainClass.value, 10);
      requestExplanation(target === explain.predicted ? null : target);
    });
    el.explainShow.addEventListener("change", function () {
      app.classList.toggle("heat-hidden", !el.explainShow.checked);
    });
    el.explainOpacity.addEventListener("input", function () {
      app.style.setProperty("--heat-opacity", String(el.explainOpacity.value / 100));
    });
    el.explainRetry.addEventListener("click", function () { requestExplanation(explain.target); });
    el.original.addEventListener("load", placeOriginalOverlay);
    if (window.ResizeObserver) new ResizeObserver(placeOriginalOverlay).observe(el.originalFrame);
    else window.addEventListener("resize", placeOriginalOverlay);
    setExplainState("idle");
  } else {
    setExplainState("off");
  }

  // ---------------------------------------------------------------- events

  el.input.addEventListener("change", function () {
    var files = el.input.files;
    if (files && files.length) {
      var f = files[0];
      el.input.value = ""; // choosing the same file again must trigger another upload
      upload(f);
    }
  });

  // Drag and drop: the whole window accepts drops so a near miss does not navigate away.
  var dragDepth = 0;
  function hasFiles(ev) {
    var dt = ev.dataTransfer;
    return dt && Array.prototype.indexOf.call(dt.types || [], "Files") >= 0;
  }
  window.addEventListener("dragenter", function (ev) {
    if (!hasFiles(ev)) return;
    ev.preventDefault();
    dragDepth += 1;
    el.dropZone.classList.add("is-dragover");
  });
  window.addEventListener("dragover", function (ev) {
    if (!hasFiles(ev)) return;
    ev.preventDefault();
    ev.dataTransfer.dropEffect = "copy";
  });
  window.addEventListener("dragleave", function (ev) {
    if (!hasFiles(ev)) return;
    dragDepth = Math.max(0, dragDepth - 1);
    if (dragDepth === 0) el.dropZone.classList.remove("is-dragover");
  });
  window.addEventListener("drop", function (ev) {
    if (!hasFiles(ev)) return;
    ev.preventDefault();
    dragDepth = 0;
    el.dropZone.classList.remove("is-dragover");
    handleFiles(ev.dataTransfer.files);
  });

  // Paste an image from the clipboard.
  document.addEventListener("paste", function (ev) {
    var files = ev.clipboardData && ev.clipboardData.files;
    if (files && files.length) {
      ev.preventDefault();
      handleFiles(files);
    }
  });

  loadReference(); // warm the cache while the person picks a file
})();
