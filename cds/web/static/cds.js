// Live countdown to each alert's acknowledgement deadline, and times shown in the device's zone.
// No network requests; elements added later (live queue updates) are picked up on the next tick.
(function () {
  var lang = document.documentElement.lang || undefined;

  function countdown(el, now) {
    var left = Math.round((Date.parse(el.dataset.due) - now) / 1000);
    var a = Math.abs(left);
    var h = Math.floor(a / 3600), m = Math.floor((a % 3600) / 60), s = a % 60;
    var clock = (h ? h + ":" + String(m).padStart(2, "0") : String(m)) + ":" + String(s).padStart(2, "0");
    el.textContent = (left < 0 ? "-" + clock + " " + el.dataset.overdue : clock);
    el.classList.toggle("overdue", left < 0);
  }

  function localTimes(root) {
    root.querySelectorAll("time[data-local]:not([data-done])").forEach(function (el) {
      var when = new Date(el.getAttribute("datetime"));
      if (isNaN(when)) { return; }
      var opts = { hour: "2-digit", minute: "2-digit" };
      if (el.hasAttribute("data-with-date")) { opts.year = "numeric"; opts.month = "2-digit"; opts.day = "2-digit"; }
      el.textContent = when.toLocaleString(lang, opts);
      el.title = el.getAttribute("datetime");
      el.setAttribute("data-done", "");
    });
  }

  function tick() {
    var now = Date.now();
    document.querySelectorAll("[data-due]").forEach(function (el) { countdown(el, now); });
    localTimes(document);
  }

  window.cdsRefreshClock = tick;
  tick();
  setInterval(tick, 1000);
})();
