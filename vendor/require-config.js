// The widget bundles are named AMD modules ("@jupyter-widgets/base", "@jupyter-widgets/controls") whose
// webpack public path is taken from their requirejs module URI. Without a mapping that URI resolves against
// the page ("book/@jupyter-widgets/…"), and the icon fonts they load 404. Map the namespace to the vendored
// dist folder, where those fonts are.
(function () {
  var here = document.currentScript && document.currentScript.src;
  var base = here ? here.replace(/require-config\.js.*$/, "") : "vendored/";
  if (window.require && window.require.config) {
    var dist = base + "html-manager/dist";
    // requirejs takes the longest matching prefix: the manager's own modules, then the rest of the namespace
    window.require.config({ paths: { "@jupyter-widgets/html-manager/dist": dist, "@jupyter-widgets": dist } });
  }
})();
