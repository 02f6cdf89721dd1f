"""The web console's pages, one module per section of :class:`e2a.console.routes.Console`
(each a mixin of its methods), and what they share (:mod:`e2a.console.pages.common`)."""
