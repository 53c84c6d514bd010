// The console's only script (served from /console/assets/, so the Content-Security-Policy
// can forbid inline scripts). It keeps the overview live: every element with a `data-live`
// attribute is replaced, every 2 seconds, by the HTML fragment that URL answers. The
// fragment is rendered and escaped by the relay. Everything else on the console is plain
// links and forms and works without this script.
"use strict";

(function () {
  var PERIOD_MS = 2000;

  function refresh(region) {
    var url = region.getAttribute("data-live");
    fetch(url, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (response) {
        if (response.status === 401) {
          // The session ended (expired, signed out elsewhere, or the relay restarted).
          window.location.assign("/console/login");
          return null;
        }
        if (!response.ok) {
          throw new Error("HTTP " + response.status);
        }
        return response.text();
      })
      .then(function (html) {
        if (html === null) {
          return;
        }
        // Keep the keyboard focus where it was when the element is still there.
        var focused = document.activeElement;
        var focusedId = focused && region.contains(focused) ? focused.id : "";
        region.innerHTML = html;
        region.removeAttribute("data-stale");
        if (focusedId) {
          var again = document.getElementById(focusedId);
          if (again) {
            again.focus();
          }
        }
      })
      .catch(function () {
        // The relay is restarting or the network is down: say so, and keep trying.
        region.setAttribute("data-stale", "true");
      });
  }

  function start() {
    var regions = document.querySelectorAll("[data-live]");
    if (regions.length === 0) {
      return;
    }
    window.setInterval(function () {
      if (document.hidden) {
        return;
      }
      regions.forEach(refresh);
    }, PERIOD_MS);
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
