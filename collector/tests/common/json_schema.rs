//! A validator for the subset of JSON Schema (2020-12, as OpenAPI 3.1 uses it) that
//! `collector/openapi.json` is written in: `type` (one name or an array of names), `properties`,
//! `required`, `additionalProperties` (`false` or a schema), `items`, `enum`, `oneOf`,
//! `minimum`, `maximum` and `$ref` to `#/…` in the same document. `description`, `format`,
//! `title` and `examples` are annotations and not checked. Any other keyword is an error, so the
//! document cannot use a keyword this validator would silently ignore.
//!
//! It also records which properties of which schema it saw in a valid instance
//! ([`Validator::seen`]), so a test can tell a documented field the server never sends.

#![allow(dead_code)]

use std::collections::BTreeSet;

use serde_json::{Map, Value};

const CHECKED: &[&str] = &[
    "$ref",
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "enum",
    "oneOf",
    "minimum",
    "maximum",
];
const ANNOTATIONS: &[&str] = &["description", "format", "title", "examples"];

/// Validates instances against schemas of one document.
#[derive(Debug)]
pub struct Validator<'a> {
    doc: &'a Value,
    /// `(schema, property)` of every property met in a valid instance. The schema is named by
    /// the component it belongs to (`Host`), with `#k` for the k-th `oneOf` branch and
    /// `.name` / `[]` for objects nested inline (see [`properties_of`]).
    pub seen: BTreeSet<(String, String)>,
}

/// The schema (or other node) a local `$ref` points to.
pub fn resolve<'a>(doc: &'a Value, reference: &str) -> Option<&'a Value> {
    let pointer = reference.strip_prefix('#')?;
    doc.pointer(pointer)
}

/// Every `$ref` value in `v`, in document order.
pub fn refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("$ref", Value::String(r)) => out.push(r.clone()),
                    _ => refs(v, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
        _ => {}
    }
}

/// Every `(schema, property)` a schema declares, named as [`Validator::seen`] names them;
/// `$ref`s are not followed (the component they name is listed on its own).
pub fn properties_of(schema: &Value, name: &str, out: &mut BTreeSet<(String, String)>) {
    let Some(m) = schema.as_object() else { return };
    if let Some(Value::Object(props)) = m.get("properties") {
        for (p, s) in props {
            out.insert((name.to_string(), p.clone()));
            properties_of(s, &format!("{name}.{p}"), out);
        }
    }
    if let Some(items) = m.get("items") {
        properties_of(items, &format!("{name}[]"), out);
    }
    if let Some(Value::Array(branches)) = m.get("oneOf") {
        for (k, b) in branches.iter().enumerate() {
            properties_of(b, &format!("{name}#{k}"), out);
        }
    }
    if let Some(ap @ Value::Object(_)) = m.get("additionalProperties") {
        properties_of(ap, &format!("{name}{{}}"), out);
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn type_matches(want: &str, v: &Value) -> Result<bool, String> {
    let have = type_name(v);
    match want {
        "null" | "boolean" | "integer" | "string" | "array" | "object" => Ok(want == have),
        "number" => Ok(have == "number" || have == "integer"),
        other => Err(format!("unknown type name {other:?} in the schema")),
    }
}

impl<'a> Validator<'a> {
    pub fn new(doc: &'a Value) -> Self {
        Validator {
            doc,
            seen: BTreeSet::new(),
        }
    }

    /// Checks `value` against `schema`; `name` names the schema for [`Validator::seen`] and
    /// `at` is where `value` is, for the error message.
    pub fn validate(
        &mut self,
        schema: &Value,
        name: &str,
        value: &Value,
        at: &str,
    ) -> Result<(), String> {
        let m = match schema {
            Value::Bool(true) => return Ok(()),
            Value::Bool(false) => return Err(format!("{at}: nothing is allowed here")),
            Value::Object(m) => m,
            other => return Err(format!("{at}: the schema is not an object: {other}")),
        };
        for k in m.keys() {
            if !CHECKED.contains(&k.as_str()) && !ANNOTATIONS.contains(&k.as_str()) {
                return Err(format!("{at}: schema keyword {k:?} is not supported"));
            }
        }
        if let Some(r) = m.get("$ref") {
            let r = r
                .as_str()
                .ok_or_else(|| format!("{at}: $ref is not a string"))?;
            if m.keys()
                .any(|k| !ANNOTATIONS.contains(&k.as_str()) && k != "$ref")
            {
                return Err(format!("{at}: $ref {r} has sibling keywords"));
            }
            let target = resolve(self.doc, r).ok_or_else(|| format!("{at}: dangling $ref {r}"))?;
            let target_name = r.rsplit('/').next().unwrap_or(r).to_string();
            return self.validate(target, &target_name, value, at);
        }
        if let Some(t) = m.get("type") {
            let names: Vec<&str> = match t {
                Value::String(s) => vec![s.as_str()],
                Value::Array(a) => a
                    .iter()
                    .map(|n| {
                        n.as_str()
                            .ok_or_else(|| format!("{at}: bad type array {t}"))
                    })
                    .collect::<Result<_, _>>()?,
                _ => return Err(format!("{at}: bad type {t}")),
            };
            let mut ok = false;
            for n in &names {
                ok |= type_matches(n, value)?;
            }
            if !ok {
                return Err(format!(
                    "{at}: expected {}, found {} {value}",
                    names.join(" or "),
                    type_name(value)
                ));
            }
        }
        if let Some(e) = m.get("enum") {
            let allowed = e
                .as_array()
                .ok_or_else(|| format!("{at}: enum is not an array"))?;
            if !allowed.contains(value) {
                return Err(format!("{at}: {value} is not one of {e}"));
            }
        }
        if let Some(n) = value.as_f64() {
            if let Some(min) = m.get("minimum").and_then(Value::as_f64)
                && n < min
            {
                return Err(format!("{at}: {value} is below the minimum {min}"));
            }
            if let Some(max) = m.get("maximum").and_then(Value::as_f64)
                && n > max
            {
                return Err(format!("{at}: {value} is above the maximum {max}"));
            }
        }
        if let Some(branches) = m.get("oneOf") {
            let branches = branches
                .as_array()
                .ok_or_else(|| format!("{at}: oneOf is not an array"))?;
            let mut passed = Vec::new();
            let mut errors = Vec::new();
            for (k, b) in branches.iter().enumerate() {
                let mut sub = Validator::new(self.doc);
                match sub.validate(b, &format!("{name}#{k}"), value, at) {
                    Ok(()) => passed.push(sub.seen),
                    Err(e) => errors.push(e),
                }
            }
            match passed.len() {
                1 => self.seen.extend(passed.pop().into_iter().flatten()),
                0 => return Err(format!("{at}: matches no branch of oneOf: {errors:?}")),
                n => return Err(format!("{at}: matches {n} branches of oneOf, not one")),
            }
        }
        if let Value::Object(obj) = value {
            self.object(m, name, obj, at)?;
        }
        if let (Value::Array(items), Some(item_schema)) = (value, m.get("items")) {
            for (k, item) in items.iter().enumerate() {
                self.validate(
                    item_schema,
                    &format!("{name}[]"),
                    item,
                    &format!("{at}[{k}]"),
                )?;
            }
        }
        Ok(())
    }

    fn object(
        &mut self,
        m: &Map<String, Value>,
        name: &str,
        obj: &Map<String, Value>,
        at: &str,
    ) -> Result<(), String> {
        let empty = Map::new();
        let props = match m.get("properties") {
            None => &empty,
            Some(Value::Object(p)) => p,
            Some(other) => return Err(format!("{at}: properties is not an object: {other}")),
        };
        if let Some(req) = m.get("required") {
            let req = req
                .as_array()
                .ok_or_else(|| format!("{at}: required is not an array"))?;
            for r in req {
                let r = r
                    .as_str()
                    .ok_or_else(|| format!("{at}: required holds {r}"))?;
                if !obj.contains_key(r) {
                    return Err(format!("{at}: required field {r:?} is missing"));
                }
            }
        }
        for (k, v) in obj {
            let here = format!("{at}.{k}");
            if let Some(s) = props.get(k) {
                self.validate(s, &format!("{name}.{k}"), v, &here)?;
                self.seen.insert((name.to_string(), k.clone()));
                continue;
            }
            match m.get("additionalProperties") {
                None | Some(Value::Bool(true)) => {}
                Some(Value::Bool(false)) => {
                    return Err(format!("{here}: field {k:?} is not in the schema"));
                }
                Some(s) => self.validate(s, &format!("{name}{{}}"), v, &here)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc() -> Value {
        json!({
            "components": {"schemas": {
                "Thing": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string"},
                        "n": {"type": "integer", "minimum": 0},
                        "colour": {"type": "string", "enum": ["red", "blue"]},
                        "tags": {"type": "array", "items": {"type": "string"}},
                        "maybe": {"type": ["string", "null"]},
                        "ratio": {"type": "number"},
                        "inner": {"$ref": "#/components/schemas/Inner"},
                        "labels": {"type": "object", "additionalProperties": {"type": "string"}}
                    },
                    "required": ["id", "n"],
                    "additionalProperties": false
                },
                "Inner": {
                    "oneOf": [
                        {"type": "object", "properties": {"text": {"type": "string"}},
                         "required": ["text"], "additionalProperties": false},
                        {"type": "object", "properties": {"bytes": {"type": "string"}},
                         "required": ["bytes"], "additionalProperties": false}
                    ]
                }
            }}
        })
    }

    fn check(v: Value) -> Result<(), String> {
        let d = doc();
        let mut val = Validator::new(&d);
        val.validate(
            &json!({"$ref": "#/components/schemas/Thing"}),
            "Thing",
            &v,
            "$",
        )
    }

    #[test]
    fn accepts_a_valid_instance_and_records_what_it_saw() {
        let d = doc();
        let mut val = Validator::new(&d);
        val.validate(
            &json!({"$ref": "#/components/schemas/Thing"}),
            "Thing",
            &json!({"id": "a", "n": 3, "colour": "red", "tags": ["x"], "maybe": null,
                    "ratio": 0.5, "inner": {"bytes": "AA=="}, "labels": {"k": "v"}}),
            "$",
        )
        .unwrap();
        assert!(val.seen.contains(&("Thing".into(), "colour".into())));
        assert!(val.seen.contains(&("Inner#1".into(), "bytes".into())));
        assert!(!val.seen.contains(&("Inner#0".into(), "text".into())));
        // An integer is a number; a string in a string-or-null field.
        check(json!({"id": "a", "n": 0, "ratio": 2, "maybe": "x"})).unwrap();
    }

    #[test]
    fn rejects_a_missing_required_field() {
        let e = check(json!({"id": "a"})).unwrap_err();
        assert!(e.contains("required field \"n\" is missing"), "{e}");
    }

    #[test]
    fn rejects_an_extra_field() {
        let e = check(json!({"id": "a", "n": 1, "new_field": true})).unwrap_err();
        assert!(e.contains("\"new_field\" is not in the schema"), "{e}");
        // Also inside a oneOf branch.
        let e = check(json!({"id": "a", "n": 1, "inner": {"text": "x", "more": 1}})).unwrap_err();
        assert!(e.contains("matches no branch"), "{e}");
    }

    #[test]
    fn rejects_a_wrong_type() {
        for bad in [
            json!({"id": 1, "n": 1}),
            json!({"id": "a", "n": "1"}),
            json!({"id": "a", "n": 1.5}),
            json!({"id": "a", "n": 1, "tags": "x"}),
            json!({"id": "a", "n": 1, "tags": [1]}),
            json!({"id": "a", "n": 1, "maybe": 3}),
            json!({"id": "a", "n": 1, "labels": {"k": 1}}),
            json!({"id": "a", "n": 1, "ratio": "0.5"}),
            json!([]),
        ] {
            let e = check(bad.clone()).unwrap_err();
            assert!(e.contains("expected"), "{bad}: {e}");
        }
    }

    #[test]
    fn rejects_a_wrong_enum_value_and_a_range() {
        let e = check(json!({"id": "a", "n": 1, "colour": "green"})).unwrap_err();
        assert!(e.contains("is not one of"), "{e}");
        let e = check(json!({"id": "a", "n": -1})).unwrap_err();
        assert!(e.contains("below the minimum"), "{e}");
    }

    #[test]
    fn one_of_needs_exactly_one_branch() {
        let e = check(json!({"id": "a", "n": 1, "inner": {}})).unwrap_err();
        assert!(e.contains("matches no branch"), "{e}");
        let d = json!({});
        let mut v = Validator::new(&d);
        let e = v
            .validate(
                &json!({"oneOf": [{"type": "string"}, {"type": ["string", "null"]}]}),
                "X",
                &json!("s"),
                "$",
            )
            .unwrap_err();
        assert!(e.contains("matches 2 branches"), "{e}");
    }

    #[test]
    fn refuses_dangling_refs_and_unknown_keywords() {
        let d = doc();
        let mut v = Validator::new(&d);
        let e = v
            .validate(
                &json!({"$ref": "#/components/schemas/Nope"}),
                "X",
                &json!(1),
                "$",
            )
            .unwrap_err();
        assert!(e.contains("dangling $ref"), "{e}");
        let e = v
            .validate(
                &json!({"type": "string", "pattern": "^a"}),
                "X",
                &json!("b"),
                "$",
            )
            .unwrap_err();
        assert!(e.contains("\"pattern\" is not supported"), "{e}");
    }

    #[test]
    fn lists_properties_and_refs() {
        let d = doc();
        let mut props = BTreeSet::new();
        properties_of(&d["components"]["schemas"]["Thing"], "Thing", &mut props);
        properties_of(&d["components"]["schemas"]["Inner"], "Inner", &mut props);
        assert!(props.contains(&("Thing".into(), "labels".into())));
        assert!(props.contains(&("Inner#0".into(), "text".into())));
        assert_eq!(props.len(), 10);
        let mut r = Vec::new();
        refs(&d, &mut r);
        assert_eq!(r, ["#/components/schemas/Inner"]);
        assert!(resolve(&d, &r[0]).is_some());
        assert!(resolve(&d, "#/components/schemas/Nope").is_none());
    }
}
