/* report_builder: small helpers for reading a report in a browser. No network, no libraries. With scripts off,
   every table and link still works; these only add search, sorting and the highlighted contents entry. */
(function () {
  "use strict";
  var params = new URLSearchParams(location.search || location.hash.replace(/^#/, "?"));

  function cellValue(row, index) {
    var cell = row.cells[index];
    if (!cell) return "";
    var raw = cell.getAttribute("data-value");
    return raw !== null ? raw : cell.textContent.trim();
  }

  function asNumber(text) {
    var n = parseFloat(String(text).replace(/[,\s%]/g, ""));
    return isNaN(n) ? null : n;
  }

  function sortBy(table, index, descending) {
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var numeric = rows.every(function (r) { var v = cellValue(r, index); return v === "" || v === "—" || asNumber(v) !== null; });
    rows.sort(function (a, b) {
      var x = cellValue(a, index), y = cellValue(b, index), order;
      if (numeric) {
        var p = asNumber(x), q = asNumber(y);
        if (p === null) return 1;
        if (q === null) return -1;
        order = p - q;
      } else {
        order = x.localeCompare(y);
      }
      return descending ? -order : order;
    });
    rows.forEach(function (r) { body.appendChild(r); });
    Array.prototype.forEach.call(table.tHead.rows[table.tHead.rows.length - 1].cells, function (th, i) {
      th.setAttribute("aria-sort", i === index ? (descending ? "descending" : "ascending") : "none");
    });
  }

  function makeSortable(table) {
    var header = table.tHead && table.tHead.rows[table.tHead.rows.length - 1];
    if (!header || !table.tBodies[0]) return;
    Array.prototype.forEach.call(header.cells, function (th, index) {
      th.classList.add("sort");
      th.title = "sort by this column";
      th.addEventListener("click", function () {
        sortBy(table, index, th.getAttribute("aria-sort") === "ascending");
      });
    });
  }

  function makeSearchable(table, query) {
    var box = document.createElement("div");
    box.className = "search";
    var input = document.createElement("input");
    input.type = "search";
    input.placeholder = table.getAttribute("data-search") || "search";
    input.setAttribute("aria-label", input.placeholder);
    var count = document.createElement("span");
    count.className = "count";
    box.appendChild(input);
    box.appendChild(count);
    table.parentNode.insertBefore(box, table);
    var rows = Array.prototype.slice.call(table.tBodies[0].rows);
    function filter() {
      var words = input.value.toLowerCase().split(/\s+/).filter(Boolean), shown = 0;
      rows.forEach(function (r) {
        var text = r.textContent.toLowerCase();
        var keep = words.every(function (w) { return text.indexOf(w) >= 0; });
        r.hidden = !keep;
        if (keep) shown += 1;
      });
      count.textContent = shown + " of " + rows.length + " rows";
      table.setAttribute("data-shown", String(shown));
    }
    input.addEventListener("input", filter);
    if (query) input.value = query;
    filter();
  }

  function highlightContents() {
    var links = {};
    document.querySelectorAll("nav.toc a[href^='#']").forEach(function (a) { links[a.getAttribute("href").slice(1)] = a; });
    if (!("IntersectionObserver" in window)) return;
    var observer = new IntersectionObserver(function (entries) {
      entries.forEach(function (entry) {
        if (!entry.isIntersecting || !links[entry.target.id]) return;
        Object.keys(links).forEach(function (id) { links[id].classList.toggle("current", id === entry.target.id); });
      });
    }, {rootMargin: "0px 0px -70% 0px"});
    document.querySelectorAll("section.section[id]").forEach(function (s) { observer.observe(s); });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var query = params.get("q");
    document.querySelectorAll("table.sortable").forEach(makeSortable);
    document.querySelectorAll("table.searchable").forEach(function (t) { makeSearchable(t, query); });
    var sort = params.get("sort");  /* e.g. ?sort=5-desc: the sixth column, largest first */
    if (sort) {
      var parts = sort.split("-");
      document.querySelectorAll("table.sortable").forEach(function (t) { sortBy(t, parseInt(parts[0], 10), parts[1] === "desc"); });
    }
    highlightContents();
    document.documentElement.classList.add("scripted");
  });
})();
