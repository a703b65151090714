// Live countdown to each alert's acknowledgement deadline; no network requests beyond this server.
(function () {
  function tick() {
    var now = Date.now();
    document.querySelectorAll("td.due[data-due]").forEach(function (cell) {
      var left = Math.round((Date.parse(cell.dataset.due) - now) / 1000);
      var sign = left < 0 ? "-" : "";
      var a = Math.abs(left);
      cell.textContent = sign + Math.floor(a / 60) + ":" + String(a % 60).padStart(2, "0") +
        (left < 0 ? " " + cell.dataset.overdue : "");
      cell.classList.toggle("overdue", left < 0);
    });
  }
  tick();
  setInterval(tick, 1000);
})();
