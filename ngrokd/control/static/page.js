// Live updates for the ngrokd page: events over server-sent events, the
// daemon and endpoint sections re-read every few seconds, and the times
// counted on the reader's clock. Nothing here changes the daemon.
"use strict";
(function () {
  var REFRESH_MS = 5000;
  var EVENTS_KEPT = 200;
  var skew = Date.now() / 1000 - parseFloat(document.body.dataset.now);
  var events = document.getElementById("events");
  var feedState = document.getElementById("feed-state");
  var refreshing = false;

  function duration(seconds) {
    seconds = Math.max(0, Math.floor(seconds));
    var units = [["d", 86400], ["h", 3600], ["min", 60], ["s", 1]];
    var parts = [];
    for (var i = 0; i < units.length && parts.length < 2; i++) {
      var amount = Math.floor(seconds / units[i][1]);
      seconds -= amount * units[i][1];
      if (amount || parts.length) parts.push(amount + " " + units[i][0]);
    }
    return parts.length ? parts.join(" ") : "0 s";
  }

  function tick() {
    var now = Date.now() / 1000 - skew;
    document.querySelectorAll("[data-until]").forEach(function (el) {
      var left = parseFloat(el.dataset.until) - now;
      el.textContent = left > 0 ? "in " + duration(left) : "expired";
    });
    document.querySelectorAll("[data-ago]").forEach(function (el) {
      el.textContent = duration(now - parseFloat(el.dataset.ago)) + " ago";
    });
    document.querySelectorAll("[data-since]").forEach(function (el) {
      el.textContent = duration(now - parseFloat(el.dataset.since));
    });
  }

  function refresh() {
    if (refreshing) return;
    refreshing = true;
    fetch(location.href, { credentials: "omit", cache: "no-store" })
      .then(function (response) { return response.ok ? response.text() : null; })
      .then(function (text) {
        if (text === null) return;
        var fresh = new DOMParser().parseFromString(text, "text/html");
        var live = fresh.getElementById("live");
        var ready = fresh.getElementById("ready");
        if (live) document.getElementById("live").replaceWith(live);
        if (ready) document.getElementById("ready").replaceWith(ready);
        skew = Date.now() / 1000 - parseFloat(fresh.body.dataset.now);
        tick();
      })
      .catch(function () {})
      .finally(function () { refreshing = false; });
  }

  function show(event) {
    var item = document.createElement("li");
    item.dataset.id = event.id;
    var when = new Date(event.time * 1000);
    var time = document.createElement("time");
    time.dateTime = when.toISOString();
    time.textContent = when.toISOString().slice(11, 19);
    var kind = document.createElement("span");
    kind.className = "kind";
    kind.textContent = event.kind;
    item.append(time, " ", kind, " " + event.message);
    events.prepend(item);
    while (events.children.length > EVENTS_KEPT) events.lastElementChild.remove();
  }

  var source = new EventSource("/events?after=" + encodeURIComponent(events.dataset.last));
  source.onopen = function () { feedState.textContent = "Live."; };
  source.onerror = function () {
    feedState.textContent = source.readyState === EventSource.CLOSED
      ? "Live feed unavailable; the page still refreshes every 5 seconds."
      : "Live feed interrupted; retrying.";
  };
  source.onmessage = function (message) {
    var event = JSON.parse(message.data);
    if (events.querySelector('[data-id="' + event.id + '"]')) return;
    show(event);
    refresh();
  };
  tick();
  setInterval(tick, 1000);
  setInterval(refresh, REFRESH_MS);
})();
