//! The console's HTML templates and static files, compiled into the binary (no CDN, no
//! internet needed).
//!
//! Templates are named `*.html`, so minijinja escapes every value put into them (a name
//! without `.html` — `render_str` — would not: never render console pages that way).

use axum::{
    http::{HeaderValue, header},
    response::{IntoResponse, Response},
};

/// Every template, by name.
pub const TEMPLATES: &[(&str, &str)] = &[
    ("base.html", include_str!("templates/base.html")),
    ("refusal.html", include_str!("templates/refusal.html")),
    ("overview.html", include_str!("templates/overview.html")),
    ("catalogue.html", include_str!("templates/catalogue.html")),
    ("department.html", include_str!("templates/department.html")),
    ("explain.html", include_str!("templates/explain.html")),
    ("preview.html", include_str!("templates/preview.html")),
    ("audit.html", include_str!("templates/audit.html")),
    ("league.html", include_str!("templates/league.html")),
    ("proposals.html", include_str!("templates/proposals.html")),
];

pub fn environment() -> minijinja::Environment<'static> {
    let mut env = minijinja::Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    for (name, body) in TEMPLATES {
        // The templates are part of the binary: one that does not parse is a build defect,
        // caught by `every_template_renders` before it ships.
        if let Err(e) = env.add_template(name, body) {
            tracing::error!(template = name, error = %e, "console template does not parse");
        }
    }
    env
}

const CSS: &str = include_str!("templates/console.css");
const JS: &str = include_str!("templates/console.js");

fn asset(body: &'static str, ty: &'static str) -> Response {
    let mut r = body.into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ty));
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, max-age=3600"),
    );
    r
}

pub async fn css() -> Response {
    asset(CSS, "text/css; charset=utf-8")
}

pub async fn js() -> Response {
    asset(JS, "text/javascript; charset=utf-8")
}
