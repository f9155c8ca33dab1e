//! Turns what a device sent into dweet content, accepting every form seen in the wild: a JSON
//! object body, a query string (`?hello=world&h=18.5`) on GET or on a body-less POST (Arduino
//! sketches), a form-encoded body, and a GET that carries a JSON body (an old node client).

use serde_json::{Map, Value};

use super::Refusal;
use crate::protocol::{RESERVED_QUERY_KEYS, coerce_query_value as coerce, json_kind};

/// Builds the content from the body (if any) and the query pairs, body keys first. Protocol
/// parameters (`key`, `callback`, `_`) never become content.
pub fn from_request(
    body: &[u8],
    content_type: Option<&str>,
    query: &[(String, String)],
) -> Result<Map<String, Value>, Refusal> {
    let mut content = parse_body(body, content_type)?;
    for (name, value) in query {
        if !RESERVED_QUERY_KEYS.contains(&name.as_str()) {
            content.insert(name.clone(), coerce(value));
        }
    }
    Ok(content)
}

fn parse_body(body: &[u8], content_type: Option<&str>) -> Result<Map<String, Value>, Refusal> {
    let body = body.trim_ascii();
    if body.is_empty() {
        return Ok(Map::new());
    }
    let form = content_type.is_some_and(|ct| {
        ct.trim_start()
            .to_ascii_lowercase()
            .starts_with("application/x-www-form-urlencoded")
    });
    if form && body[0] != b'{' {
        return Ok(form_urlencoded::parse(body)
            .map(|(name, value)| (name.into_owned(), coerce(&value)))
            .collect());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(Refusal::new(
            400,
            format!(
                "the dweet content must be a JSON object, not {}",
                json_kind(&other)
            ),
        )),
        Err(e) => Err(Refusal::new(
            400,
            format!("the request body is not valid JSON: {e}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn query_values_that_are_numbers_become_numbers() {
        let content =
            from_request(b"", None, &pairs(&[("hello", "world"), ("h", "18.5")])).unwrap();
        assert_eq!(Value::Object(content), json!({"hello": "world", "h": 18.5}));
    }

    #[test]
    fn reserved_parameters_never_enter_content() {
        let query = pairs(&[("key", "k"), ("callback", "cb"), ("_", "1"), ("a", "1")]);
        let content = from_request(b"", None, &query).unwrap();
        assert_eq!(Value::Object(content), json!({"a": 1}));
    }

    #[test]
    fn json_body_keeps_order_and_query_is_merged_after() {
        let content = from_request(
            br#"{"z":1,"a":{"b":2}}"#,
            Some("application/json"),
            &pairs(&[("q", "x")]),
        )
        .unwrap();
        assert_eq!(
            serde_json::to_string(&content).unwrap(),
            r#"{"z":1,"a":{"b":2},"q":"x"}"#
        );
    }

    #[test]
    fn form_bodies_are_accepted() {
        let content = from_request(
            b"t=21.5&name=a+b",
            Some("application/x-www-form-urlencoded"),
            &[],
        )
        .unwrap();
        assert_eq!(Value::Object(content), json!({"t": 21.5, "name": "a b"}));
    }

    #[test]
    fn bad_bodies_are_refused_with_a_reason() {
        let refusal = from_request(b"{not json", None, &[]).unwrap_err();
        assert!(
            refusal
                .because
                .starts_with("the request body is not valid JSON")
        );
        let refusal = from_request(b"[1,2]", None, &[]).unwrap_err();
        assert_eq!(
            refusal.because,
            "the dweet content must be a JSON object, not an array"
        );
    }
}
