// fbh leaderboard site: sortable tables and Chart.js plots. Loaded as a file (the pages'
// Content-Security-Policy refuses inline scripts); plot data comes from JSON blocks in the page.
"use strict";

(function () {
  // ------------------------------------------------------------------ sorting
  function valueOf(row, index, numeric) {
    const cell = row.cells[index];
    const raw = cell && cell.dataset.value;
    if (raw === undefined || raw === "") return null;
    return numeric ? parseFloat(raw) : raw.toLowerCase();
  }

  // Each tbody (references, submissions) is sorted on its own, so references stay on top.
  function sortTable(table, index, numeric, descending) {
    for (const body of table.tBodies) {
      const rows = Array.from(body.rows);
      rows.sort(function (a, b) {
        const x = valueOf(a, index, numeric), y = valueOf(b, index, numeric);
        if (x === null || y === null) return (x === null) - (y === null); // empty cells last
        const order = numeric ? x - y : x.localeCompare(y);
        return descending ? -order : order;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    }
  }

  function makeSortable(table) {
    const heads = Array.from(table.tHead.rows[0].cells);
    heads.forEach(function (th, index) {
      th.querySelector("button").addEventListener("click", function () {
        const numeric = th.dataset.type === "number";
        const current = th.getAttribute("aria-sort");
        // First click: numbers best-first (descending), text A to Z; later clicks flip.
        const descending = current ? current === "ascending" : numeric;
        heads.forEach(function (h) { h.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", descending ? "descending" : "ascending");
        sortTable(table, index, numeric, descending);
      });
    });
  }

  // ------------------------------------------------------------------ filters
  // Submissions rows are shown only when they match every chosen filter; references and published
  // rows stay, as the yardsticks the submissions are read against.
  function applyFilters(form) {
    const table = document.getElementById(form.dataset.table);
    const chosen = Array.from(form.querySelectorAll("select[data-filter]")).map(function (s) {
      return [s.dataset.filter, s.value];
    });
    const mergesOnly = form.querySelector("#merges-only");
    if (mergesOnly && mergesOnly.checked) chosen.push(["output", "merged"]);
    let shown = 0, total = 0;
    table.querySelectorAll("tbody.submissions tr").forEach(function (row) {
      const match = chosen.every(function (c) { return !c[1] || row.dataset[c[0]] === c[1]; });
      row.hidden = !match;
      total += 1;
      if (match) shown += 1;
    });
    const counter = form.querySelector("#filter-count");
    if (counter) counter.textContent = shown + " of " + total + " submissions shown";
  }

  function setUpFilters(form) {
    form.addEventListener("change", function () { applyFilters(form); });
    const toggle = form.querySelector("#toggle-costs");
    const table = document.getElementById(form.dataset.table);
    if (toggle) {
      toggle.addEventListener("click", function () {
        const hidden = table.classList.toggle("hide-costs");
        toggle.setAttribute("aria-pressed", hidden ? "true" : "false");
        toggle.textContent = (hidden ? "Show" : "Hide") + " cost and detail columns";
      });
      // A table wider than the window starts with them hidden, so the scores fit without scrolling.
      const box = table.parentElement;
      if (box.scrollWidth > box.clientWidth) toggle.click();
    }
    applyFilters(form);
  }

  // ------------------------------------------------------------------ comparisons
  function fmt(v, digits) { return v === null || v === undefined ? "" : v.toFixed(digits); }

  // pairs[a][b] holds a minus b for a listed before b; b minus a flips every sign and swaps the bounds.
  // Each row is a list in the order of data.columns: what, a, b, difference, ci_low, ci_high, p.
  function asRecord(row) {
    return {what: row[0], a: row[1], b: row[2], difference: row[3],
            ci: row[4] === null ? null : [row[4], row[5]], p: row[6]};
  }

  function lookUp(data, a, b) {
    if (data.pairs[a] && data.pairs[a][b]) return data.pairs[a][b].map(asRecord);
    const rows = (data.pairs[b] || {})[a];
    if (!rows) return null;
    return rows.map(asRecord).map(function (r) {
      return {what: r.what, a: r.b, b: r.a, difference: r.difference === null ? null : -r.difference,
              ci: r.ci ? [-r.ci[1], -r.ci[0]] : null, p: r.p};
    });
  }

  function showComparison(data) {
    const a = document.getElementById("compare-a").value, b = document.getElementById("compare-b").value;
    const body = document.querySelector("#compare-table tbody");
    const summary = document.getElementById("compare-summary");
    body.textContent = "";
    if (a === b) { summary.textContent = "Pick two different entries."; return; }
    const rows = lookUp(data, a, b) || [];
    rows.forEach(function (r) {
      const tr = body.insertRow();
      tr.dataset.what = r.what;
      if (r.what === "average") tr.className = "average";
      [r.what, fmt(r.a, 2), fmt(r.b, 2), r.difference === null ? "" : (r.difference >= 0 ? "+" : "") + fmt(r.difference, 2),
       r.ci ? "[" + fmt(r.ci[0], 2) + ", " + fmt(r.ci[1], 2) + "]" : "", r.p === null ? "" : r.p.toPrecision(2)
      ].forEach(function (text, i) {
        const td = tr.insertCell();
        td.textContent = text;
        if (i > 0) td.className = "num";
      });
    });
    const avg = rows.find(function (r) { return r.what === "average"; });
    if (!avg || avg.difference === null) { summary.textContent = a + " vs " + b + ": no common average."; return; }
    const sure = avg.ci && (avg.ci[0] > 0 || avg.ci[1] < 0);
    summary.textContent = a + " minus " + b + " on average: " + (avg.difference >= 0 ? "+" : "") +
      fmt(avg.difference, 2) + (avg.ci ? " (95% CI " + fmt(avg.ci[0], 2) + " to " + fmt(avg.ci[1], 2) + ", p = " +
      avg.p.toPrecision(2) + "): " + (sure ? "a difference the resampling supports" : "not distinguishable") : "");
  }

  function setUpComparison() {
    const holder = document.getElementById("comparisons-data");
    const form = document.getElementById("compare-form");
    if (!holder || !form) return;
    const data = JSON.parse(holder.textContent);
    form.addEventListener("change", function () { showComparison(data); });
    showComparison(data);
  }

  // ------------------------------------------------------------------ plots
  // Every series carries its entry's colour (chosen by the site builder, one per entry label for the
  // whole page), so an entry looks the same in every chart.
  const FRONT = "#555555";
  const rgba = function (hex, alpha) {
    const n = parseInt(hex.slice(1), 16);
    return "rgba(" + (n >> 16) + "," + ((n >> 8) & 255) + "," + (n & 255) + "," + alpha + ")";
  };
  const axisTitle = function (text) { return {display: true, text: text}; };

  // Labels each point (the entry's name) and each reference level (at its right end), so a reader
  // need not hover to know which dot is which.
  const labelPlugin = {
    id: "fbhLabels",
    afterDatasetsDraw: function (chart) {
      const ctx = chart.ctx;
      ctx.save();
      ctx.font = "11px system-ui, sans-serif";
      chart.data.datasets.forEach(function (ds, i) {
        if (!ds.fbhLabel || chart.getDatasetMeta(i).hidden) return;
        const meta = chart.getDatasetMeta(i);
        const point = meta.data[ds.fbhLabel === "end" ? meta.data.length - 1 : 0];
        if (!point) return;
        // a point label that would run past the plot's right edge goes to the point's left
        const toLeft = ds.fbhLabel === "end" || point.x + 6 + ctx.measureText(ds.label).width > chart.chartArea.right;
        ctx.fillStyle = ds.borderColor;
        ctx.textAlign = toLeft ? "right" : "left";
        ctx.fillText(ds.label, point.x + (toLeft ? -6 : 6), point.y - 5);
      });
      ctx.restore();
    },
  };

  function paretoConfig(spec) {
    const xs = spec.points.map(function (p) { return p.x; });
    const logScale = xs.length > 0 && xs.every(function (x) { return x > 0; });
    const lo = xs.length ? Math.min.apply(null, xs) : 0, hi = xs.length ? Math.max.apply(null, xs) : 1;
    const datasets = spec.points.map(function (p) {
      return {label: p.label, data: [p], borderColor: p.color, backgroundColor: rgba(p.color, 0.8), pointRadius: 5,
              fbhLabel: "point"};
    });
    datasets.push({label: "Pareto front", data: spec.front, showLine: true, borderColor: FRONT,
                   backgroundColor: FRONT, pointRadius: 0, borderWidth: 1});
    spec.references.forEach(function (r) {
      datasets.push({label: r.label, data: [{x: lo, y: r.y, label: r.label}, {x: hi, y: r.y, label: r.label}],
                     showLine: true, borderDash: [6, 4], borderColor: r.color, pointRadius: 0, borderWidth: 2,
                     backgroundColor: r.color, fbhLabel: "end"});
    });
    return {
      type: "scatter",
      data: {datasets: datasets},
      plugins: [labelPlugin],
      options: {
        layout: {padding: {right: 12}},
        scales: {x: {type: logScale ? "logarithmic" : "linear", title: axisTitle(spec.xTitle)},
                 y: {title: axisTitle(spec.yTitle)}},
        plugins: {legend: {display: false}, tooltip: {callbacks: {label: function (ctx) {
          const p = ctx.raw;
          return (p.label || ctx.dataset.label) + ": " + p.y.toFixed(1) + " " + (spec.yUnit || "%") + " at " +
            p.x.toFixed(2) + " " + (spec.xUnit || "");
        }}}},
      },
    };
  }

  function barsConfig(spec) {
    const datasets = spec.series.map(function (s) {
      return {label: s.label, data: s.values, borderColor: s.color, backgroundColor: rgba(s.color, 0.8),
              borderWidth: 1};
    });
    return {type: "bar", data: {labels: spec.labels, datasets: datasets},
            options: {scales: {y: {suggestedMin: 0, suggestedMax: 100, title: axisTitle(spec.yTitle)}}}};
  }

  const BUILDERS = {pareto: paretoConfig, bars: barsConfig};

  function drawChart(canvas) {
    const spec = JSON.parse(document.getElementById(canvas.dataset.chart).textContent);
    const config = BUILDERS[spec.type](spec);
    config.options.animation = false;
    config.options.maintainAspectRatio = false;
    new window.Chart(canvas, config);
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("table.sortable").forEach(makeSortable);
    document.querySelectorAll("form.filters[data-table]").forEach(setUpFilters);
    setUpComparison();
    if (window.Chart) document.querySelectorAll("canvas[data-chart]").forEach(drawChart);
  });
})();
