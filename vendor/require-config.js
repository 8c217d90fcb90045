// Resolve widget packages to the copies this book serves itself, so no page asks a CDN for code or fonts.
(function () {
  var here = document.currentScript && document.currentScript.src;
  var base = here ? here.replace(/require-config\.js.*$/, "") : "vendor/";
  if (window.require && window.require.config) {
    window.require.config({
      paths: {
        "@jupyter-widgets/html-manager/dist": base + "html-manager/dist"
      }
    });
  }
})();
