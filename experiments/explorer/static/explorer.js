// The explorer's only script: small conveniences; every page works without it.
(function () {
  "use strict";
  // Analyser: clicking a latent's column header shades the prompt strip by that latent.
  var heat = document.getElementById("heat"), strip = document.getElementById("strip");
  if (heat && strip) {
    var tokens = strip.querySelectorAll(".tok");
    heat.querySelectorAll("th.lat").forEach(function (th) {
      th.addEventListener("click", function (event) {
        if (event.target.tagName === "A") return;  // the latent's link still navigates
        var col = Number(th.dataset.col), on = th.classList.contains("on");
        heat.querySelectorAll("th.lat").forEach(function (h) { h.classList.remove("on"); });
        heat.querySelectorAll("tbody tr").forEach(function (tr, i) {
          var cell = tr.querySelectorAll("td")[col];
          var a = on ? 0 : Math.min(1, Number(cell.dataset.v) / Math.max(Number(cell.dataset.max), 1e-12));
          if (tokens[i]) tokens[i].style.backgroundColor = "rgba(255, 140, 0, " + a.toFixed(2) + ")";
        });
        if (!on) th.classList.add("on");
      });
    });
  }
  // Steering: alpha means nothing to "ablate".
  var mode = document.getElementById("mode"), alpha = document.getElementById("alpha");
  if (mode && alpha) {
    var sync = function () { alpha.disabled = mode.value === "ablate"; };
    mode.addEventListener("change", sync);
    sync();
  }
})();
