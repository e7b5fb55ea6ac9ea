// RPO over time on the item page, from the points the server embedded in the page.
(function () {
  const data = JSON.parse(document.getElementById("rpo-data").textContent);
  const canvas = document.getElementById("rpo-chart");
  if (!canvas || !window.Chart) return;
  new window.Chart(canvas, {
    type: "line",
    data: {
      labels: data.map((d) => new Date(d.t).toLocaleTimeString()),
      datasets: [{ label: "RPO (seconds)", data: data.map((d) => d.rpo), borderColor: "#0b5cad", pointRadius: 0, stepped: false, tension: 0 }],
    },
    options: { animation: false, scales: { y: { beginAtZero: true, title: { display: true, text: "seconds" } } }, plugins: { legend: { display: false } } },
  });
})();
