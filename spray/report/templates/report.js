// Optional interactivity of the audit report: class filter and click-to-zoom.
// The page is complete without it. Text from the page is only ever set with
// textContent, never parsed as HTML.
(function () {
  "use strict";

  function filterClasses() {
    var query = document.getElementById("filter-class").value.trim().toLowerCase();
    var flaggedOnly = document.getElementById("filter-flagged").checked;
    var sections = document.querySelectorAll("section.class");
    var shown = 0;
    sections.forEach(function (section) {
      var name = (section.getAttribute("data-class-name") || "").toLowerCase();
      var index = section.getAttribute("data-class-index") || "";
      var matches = query === "" || name.indexOf(query) !== -1 || index === query;
      var visible = matches && (!flaggedOnly || section.classList.contains("has-flags"));
      section.hidden = !visible;
      if (visible) { shown += 1; }
      section.querySelectorAll(".cluster").forEach(function (cluster) {
        cluster.hidden = flaggedOnly && !cluster.classList.contains("flagged");
      });
    });
    document.getElementById("filter-count").textContent =
      shown + " of " + sections.length + " analyses shown";
  }

  function setUpFilters() {
    var bar = document.getElementById("filters");
    if (!bar) { return; }
    bar.hidden = false;
    document.getElementById("filter-class").addEventListener("input", filterClasses);
    document.getElementById("filter-flagged").addEventListener("change", filterClasses);
    filterClasses();
  }

  function setUpZoom() {
    var overlay = document.getElementById("zoom");
    var image = document.getElementById("zoom-image");
    var caption = document.getElementById("zoom-caption");
    if (!overlay) { return; }
    function close() {
      overlay.hidden = true;
      image.removeAttribute("src");
    }
    document.addEventListener("click", function (event) {
      var target = event.target;
      if (overlay.contains(target)) { close(); return; }
      if (!(target instanceof HTMLImageElement)) { return; }
      var figure = target.closest("figure");
      if (!figure) { return; }
      image.src = target.src;
      image.alt = target.alt;
      caption.textContent = figure.getAttribute("title") || target.alt;
      overlay.hidden = false;
    });
    document.addEventListener("keydown", function (event) {
      if (event.key === "Escape") { close(); }
    });
  }

  setUpFilters();
  setUpZoom();
})();
