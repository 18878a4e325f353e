// Swagger UI over this server's OpenAPI document (the element's data-spec names it).
window.addEventListener("load", () => {
  const el = document.getElementById("swagger");
  window.ui = SwaggerUIBundle({ url: el.dataset.spec, dom_id: "#swagger", deepLinking: true });
});
