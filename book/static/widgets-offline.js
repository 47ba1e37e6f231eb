// Glue for the vendored ipywidgets manager. _config.yml loads it between requirejs/require.js and
// html-manager/embed-amd.js (all three copied to _static/ from book/vendor/ and book/static/).
(function () {
  "use strict";
  var here = document.currentScript.src;  // .../_static/widgets-offline.js
  // 1. embed-amd.js takes its asset folder (the Font Awesome fonts of the widget CSS) from its AMD module
  //    name, i.e. <page folder>/@jupyter-widgets/html-manager/dist/: map that name to where the bundle is.
  require.config({paths: {"@jupyter-widgets/html-manager/dist": new URL("html-manager", here).href}});
  // 2. @jupyter-widgets/controls typesets widget descriptions with MathJax 2's MathJax.Hub.Queue; the pages
  //    load MathJax 3 (deferred, so it is there by DOMContentLoaded, before widgets render on "load"),
  //    which has no Hub: forward the call to MathJax 3's typesetPromise.
  document.addEventListener("DOMContentLoaded", function () {
    var mj = window.MathJax;
    if (!mj || !mj.version || mj.Hub) {
      return;
    }
    mj.Hub = {
      Queue: function () {
        var elements = Array.prototype.slice.call(arguments)
          .filter(function (cmd) { return Array.isArray(cmd) && cmd[0] === "Typeset" && cmd[2]; })
          .map(function (cmd) { return cmd[2]; });
        var ready = (mj.startup && mj.startup.promise) || Promise.resolve();
        return ready.then(function () { return elements.length ? mj.typesetPromise(elements) : null; });
      }
    };
  });
})();
