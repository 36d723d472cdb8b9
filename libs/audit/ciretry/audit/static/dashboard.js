// Draws the dashboard's charts from the JSON the server embedded in the page (the same
// numbers as the tables). No network access: Chart.js is served from this package.
(function () {
  "use strict";
  var node = document.getElementById("audit-charts");
  if (!node || typeof Chart === "undefined") { return; }
  var charts = JSON.parse(node.textContent);
  Object.keys(charts).forEach(function (id) {
    var canvas = document.getElementById(id);
    if (!canvas) { return; }
    var spec = charts[id];
    var options = { responsive: true, maintainAspectRatio: false, animation: false };
    if (spec.stacked) {
      options.scales = {
        x: { stacked: true },
        y: { stacked: true, min: 0, max: 1, ticks: { format: { style: "percent" } } }
      };
    } else if (spec.type === "bar") {
      options.plugins = { legend: { display: false } };
    }
    new Chart(canvas, {
      type: spec.type,
      data: { labels: spec.labels, datasets: spec.datasets },
      options: options
    });
  });
  document.body.setAttribute("data-charts-ready", String(Object.keys(charts).length));
})();
