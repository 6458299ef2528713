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

  // ------------------------------------------------------------------ plots
  const PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1",
                   "#ff9da7", "#9c755f", "#bab0ac"];
  const color = function (i, alpha) {
    const hex = PALETTE[i % PALETTE.length];
    if (alpha === undefined) return hex;
    const n = parseInt(hex.slice(1), 16);
    return "rgba(" + (n >> 16) + "," + ((n >> 8) & 255) + "," + (n & 255) + "," + alpha + ")";
  };
  const axisTitle = function (text) { return {display: true, text: text}; };

  function paretoConfig(spec) {
    const xs = spec.points.map(function (p) { return p.x; });
    const logScale = xs.length > 0 && xs.every(function (x) { return x > 0; });
    const lo = xs.length ? Math.min.apply(null, xs) : 0, hi = xs.length ? Math.max.apply(null, xs) : 1;
    const datasets = [
      {label: "submissions", data: spec.points, backgroundColor: color(0, 0.7), pointRadius: 4},
      {label: "Pareto front", data: spec.front, showLine: true, borderColor: color(2), backgroundColor: color(2),
       pointRadius: 5, pointStyle: "rectRot"},
    ];
    spec.references.forEach(function (r, i) {
      datasets.push({label: r.label, data: [{x: lo, y: r.y, label: r.label}, {x: hi, y: r.y, label: r.label}],
                     showLine: true, borderDash: [6, 4], borderColor: color(i + 3), pointRadius: 0,
                     backgroundColor: color(i + 3)});
    });
    return {
      type: "scatter",
      data: {datasets: datasets},
      options: {
        scales: {x: {type: logScale ? "logarithmic" : "linear", title: axisTitle(spec.xTitle)},
                 y: {title: axisTitle(spec.yTitle)}},
        plugins: {tooltip: {callbacks: {label: function (ctx) {
          const p = ctx.raw;
          return (p.label || ctx.dataset.label) + ": " + p.y.toFixed(1) + " " + (spec.yUnit || "%") + " in " +
            p.x.toFixed(2) + " s";
        }}}},
      },
    };
  }

  function seriesDatasets(spec, fill) {
    return spec.series.map(function (s, i) {
      return {label: s.label, data: s.values, borderColor: color(i), backgroundColor: color(i, fill),
              pointRadius: 2, borderWidth: 1.5};
    });
  }

  // A radial scale has no axis title in Chart.js, so the chart's title says what the radius is.
  function radarConfig(spec) {
    return {type: "radar", data: {labels: spec.labels, datasets: seriesDatasets(spec, 0.08)},
            options: {scales: {r: {suggestedMin: 0, suggestedMax: 100}},
                      plugins: {title: {display: !!spec.valueTitle, text: spec.valueTitle}}}};
  }

  function barsConfig(spec) {
    return {type: "bar", data: {labels: spec.labels, datasets: seriesDatasets(spec, 0.75)},
            options: {scales: {y: {suggestedMin: 0, suggestedMax: 100, title: axisTitle(spec.yTitle)}}}};
  }

  const BUILDERS = {pareto: paretoConfig, radar: radarConfig, bars: barsConfig};

  function drawChart(canvas) {
    const spec = JSON.parse(document.getElementById(canvas.dataset.chart).textContent);
    const config = BUILDERS[spec.type](spec);
    config.options.animation = false;
    config.options.maintainAspectRatio = false;
    new window.Chart(canvas, config);
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("table.sortable").forEach(makeSortable);
    if (window.Chart) document.querySelectorAll("canvas[data-chart]").forEach(drawChart);
  });
})();
