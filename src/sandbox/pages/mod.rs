//! The pages people looked at on dweet.io, served by the sandbox itself (no CDN: many labs
//! have no internet): `/` the fleet at a glance, `/follow/{thing}` one thing live, `/see`
//! the latest public dweets, `/play` the API as OpenAPI with a form to try it. The files are
//! embedded in the binary; the only server-side change is the path prefix, written into
//! `{{BASE}}`. Thing names reach a page through its address and are put into the document as
//! text by the script, never as HTML.

/// The head, header and navigation every page shares; a page file is its `<main>` and script.
const SHELL: &str = include_str!("shell.html");
const INDEX: &str = include_str!("index.html");
const FOLLOW: &str = include_str!("follow.html");
const SEE: &str = include_str!("see.html");
const PLAY: &str = include_str!("play.html");
const OPENAPI: &str = include_str!("openapi.json");
const CSS: &str = include_str!("app.css");
const JS: &str = include_str!("app.js");

const HTML_TYPE: &str = "text/html; charset=utf-8";

/// The page or asset at `segments` (raw, after the prefix), with its content type.
pub fn page(segments: &[&str], base: &str) -> Option<(&'static str, String)> {
    let fill = |text: &str| text.replace("{{BASE}}", &escape(base));
    let html = |title: &str, heading: &str, body: &str| {
        let page = SHELL
            .replace("{{TITLE}}", title)
            .replace("{{HEADING}}", heading)
            .replace("{{BODY}}", body);
        Some((HTML_TYPE, fill(&page)))
    };
    match segments {
        [] | [""] => html("the fleet", "dweetpipe sandbox", INDEX),
        // The script writes the thing's name in, as text.
        ["follow", thing] if !thing.is_empty() => html("follow", "follow", FOLLOW),
        ["see"] => html("recent dweets", "recent dweets", SEE),
        ["play"] => html("API", "the API", PLAY),
        ["play", "openapi.json"] => Some(("application/json", fill(OPENAPI))),
        ["assets", "app.css"] => Some(("text/css; charset=utf-8", CSS.to_owned())),
        ["assets", "app.js"] => Some(("text/javascript; charset=utf-8", JS.to_owned())),
        _ => None,
    }
}

/// The prefix as HTML attribute text (it is checked at start, but a page must not trust it).
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('"', "&quot;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_page_names_its_assets_under_the_prefix_and_no_page_reaches_the_internet() {
        for segments in [&[][..], &["follow", "S5D9-0001"], &["see"], &["play"]] {
            let (kind, html) = page(segments, "/dweet").unwrap();
            assert_eq!(kind, HTML_TYPE);
            assert!(
                html.contains(r#"href="/dweet/assets/app.css""#),
                "{segments:?}"
            );
            assert!(html.contains(r#"content="/dweet""#));
            assert!(!html.contains("{{BASE}}"));
            assert!(
                !html.contains("src=\"http") && !html.contains("href=\"http"),
                "no CDN: {segments:?}"
            );
        }
        assert!(page(&["follow", ""], "").is_none());
        assert!(page(&["nothing"], "").is_none());
        assert!(!JS.contains("fetch(\"http") && !CSS.contains("url("));
    }

    #[test]
    fn the_openapi_document_is_json_and_describes_every_endpoint_of_the_protocol() {
        let (_, text) = page(&["play", "openapi.json"], "").unwrap();
        let spec: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(spec["servers"][0]["url"], "/");
        let paths = spec["paths"].as_object().unwrap();
        for path in [
            "/dweet/for/{thing}",
            "/dweet",
            "/dweet/quietly/for/{thing}",
            "/get/latest/dweet/for/{thing}",
            "/get/dweets/for/{thing}",
            "/listen/for/dweets/from/{thing}",
            "/lock/{thing}",
            "/unlock/{thing}",
            "/remove/lock/{lock}",
            "/alert/{who}/when/{thing}/{condition}",
            "/get/alert/for/{thing}",
            "/remove/alert/for/{thing}",
            "/get/stored/dweets/for/{thing}",
            "/get/stored/alerts/for/{thing}",
        ] {
            assert!(paths.contains_key(path), "{path}");
        }
    }

    #[test]
    fn a_hostile_prefix_cannot_break_out_of_the_attribute() {
        let (_, html) = page(&[], "/x\"><script>").unwrap();
        assert!(!html.contains("\"><script>"));
    }
}
