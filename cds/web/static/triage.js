// The nurse's queue stays current without reloading: poll the feed (ETag-conditional, so an unchanged
// queue is a 304), fetch the card of each new or changed alert, drop the ones that left, keep queue
// order, and announce new alerts in the aria-live region. Only this server is contacted.
(function () {
  var queue = document.getElementById("queue");
  if (!queue || !window.fetch) { return; }
  var etag = queue.dataset.etag ? '"' + queue.dataset.etag + '"' : null;
  var pollMs = Math.max(1, Number(queue.dataset.pollSeconds) || 5) * 1000;
  var announce = document.getElementById("announce");
  var problem = document.getElementById("feed-problem");
  var empty = document.getElementById("queue-empty");

  function cards() {
    var out = {};
    queue.querySelectorAll(":scope > article[data-alert-id]").forEach(function (el) { out[el.dataset.alertId] = el; });
    return out;
  }

  function fetchCard(id) {
    var url = queue.dataset.cardUrl.replace("__id__", encodeURIComponent(id));
    return fetch(url, { credentials: "same-origin", headers: { "Accept": "text/html" }, cache: "no-store" })
      .then(function (r) {
        if (!r.ok) { return null; }  // e.g. no longer visible to this user: leave it out
        return r.text().then(function (html) {
          var tpl = document.createElement("template");
          tpl.innerHTML = html.trim();
          return tpl.content.firstElementChild;
        });
      });
  }

  function apply(list) {
    var have = cards();
    var wanted = {};
    var fresh = [];
    var complete = true;
    var jobs = list.map(function (a) {
      wanted[a.id] = true;
      var el = have[a.id];
      if (el && el.dataset.updated === a.updated_at) { return Promise.resolve(); }
      // Never swap a card under the nurse's fingers: a card being edited is refreshed next time.
      if (el && el.contains(document.activeElement) && document.activeElement !== document.body) {
        complete = false;
        return Promise.resolve();
      }
      return fetchCard(a.id).then(function (node) {
        if (!node) { return; }
        if (el) { el.replaceWith(node); } else { fresh.push(a); queue.appendChild(node); }
        have[a.id] = node;
      });
    });
    return Promise.all(jobs).then(function () {
      Object.keys(have).forEach(function (id) { if (!wanted[id]) { have[id].remove(); delete have[id]; } });
      // Keep queue order (priority, then deadline), moving only cards that are out of place.
      var order = list.map(function (a) { return have[a.id]; }).filter(Boolean);
      order.forEach(function (el, i) {
        if (queue.children[i] !== el) { queue.insertBefore(el, queue.children[i] || null); }
      });
      empty.hidden = order.length > 0;
      if (fresh.length) {
        announce.textContent = fresh.map(function (a) {
          return queue.dataset.announceNew + ": " + a.labels.priority + ", " + a.labels.tier + ", " + a.patient;
        }).join(". ");
      }
      if (window.cdsRefreshClock) { window.cdsRefreshClock(); }
      return complete;
    });
  }

  function poll() {
    var headers = { "Accept": "application/json" };
    if (etag) { headers["If-None-Match"] = etag; }
    fetch(queue.dataset.feedUrl, { credentials: "same-origin", headers: headers, cache: "no-store" })
      .then(function (r) {
        if (r.redirected && r.url.indexOf("/auth/login") !== -1) { window.location.reload(); return null; }
        if (r.status === 304) { return null; }
        if (!r.ok) { throw new Error("feed " + r.status); }
        var tag = r.headers.get("ETag");
        return r.json().then(function (body) { return apply(body.alerts).then(function (complete) { etag = complete ? tag : null; }); });
      })
      .then(function () { problem.hidden = true; }, function () { problem.hidden = false; })
      .then(function () { setTimeout(poll, pollMs); });
  }

  setTimeout(poll, pollMs);
})();
