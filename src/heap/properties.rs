//! Heap's property rules (contract §2.4): flatten nested objects to `a.b.c` keys; keep strings;
//! booleans become `"true"`/`"false"`; nulls are dropped; arrays of scalars are joined with
//! `||`; strings and keys are cut to 1023 characters. Pure.
//!
//! Numbers arrive exactly as written (serde_json's `arbitrary_precision`), so any valid JSON
//! number reaches this module, and [`heap_number`] decides what Heap gets: a JSON number when
//! Heap, which reads numbers as 64-bit floats, reads the value Userpilot sent; otherwise the
//! number's text as a string, so that nothing is rounded or refused on the way.
//!
//! The input is attacker-shaped JSON (verified, but its content is whatever a Userpilot user
//! typed), so the walk is bounded: content nested deeper than [`MAX_DEPTH`] is dropped rather
//! than recursed into, and key prefixes are cut as they grow so a long key above a wide object
//! cannot make every leaf key expensive.

use std::borrow::Cow;

use serde_json::{Map, Number, Value};

use crate::heap::wire::Properties;

/// Heap cuts nothing itself and rejects longer values, so strings, joined arrays and keys are cut
/// to this many characters (Unicode scalar values, never bytes).
pub const MAX_CHARS: usize = 1023;

/// How many levels of objects and arrays are followed; a value at a deeper level is dropped.
/// A top-level value of `object` is at level 1.
pub const MAX_DEPTH: usize = 32;

/// 2^53: integers up to this size, in either sign, are exact in a 64-bit float, so every
/// JSON reader (JavaScript's included) reads them as written. Above it, `2^53 + 1` reads as
/// `2^53`.
pub const MAX_SAFE_INTEGER: u64 = 1 << 53;

/// Flattens `object` into Heap properties, leaving out the top-level keys in `skip`.
pub fn flatten(object: &Map<String, Value>, skip: &[&str]) -> Properties {
    let mut out = Properties::new();
    for (key, value) in object {
        if skip.contains(&key.as_str()) {
            continue;
        }
        add(&mut out, cut(key).to_owned(), value, 1);
    }
    out
}

/// `text` cut to at most [`MAX_CHARS`] characters, on a character boundary.
pub(crate) fn cut(text: &str) -> &str {
    match text.char_indices().nth(MAX_CHARS) {
        Some((end, _)) => &text[..end],
        None => text,
    }
}

fn add(out: &mut Properties, key: String, value: &Value, depth: usize) {
    if depth > MAX_DEPTH {
        return;
    }
    match value {
        Value::Null => {}
        Value::Bool(flag) => insert(out, key, Value::String(flag.to_string())),
        Value::Number(number) => insert(out, key, heap_number(number)),
        Value::String(text) => insert(out, key, Value::String(cut(text).to_owned())),
        Value::Object(map) => {
            for (name, child) in map {
                add(out, child_key(&key, name), child, depth + 1);
            }
        }
        // One structured element is enough to make joining lossy, so the whole array is
        // flattened by index instead (`answers.0.question`, `answers.1`).
        Value::Array(items) if items.iter().any(|item| item.is_object() || item.is_array()) => {
            for (index, child) in items.iter().enumerate() {
                add(out, child_key(&key, &index.to_string()), child, depth + 1);
            }
        }
        Value::Array(items) => {
            let joined = join_scalars(items);
            if !joined.is_empty() {
                insert(out, key, Value::String(joined));
            }
        }
    }
}

/// A JSON number as Heap receives it (contract §2.4):
/// - an integer (no fraction, no exponent) from -2^53 to 2^53: the number as written;
/// - any other number whose nearest 64-bit float is finite, and not zero unless the number is
///   zero: that float, in its shortest form (`1.50` -> `1.5`, `1E2` -> `100.0`), which is the
///   value Heap would read from the original;
/// - anything else (`1e400`, `1e-400`, a 30-digit integer): a string holding the number as
///   written (serde_json spells an exponent `e+N` or `e-N`: `1e400` is `"1e+400"`), cut to
///   [`MAX_CHARS`] like every string.
pub fn heap_number(number: &Number) -> Value {
    let written = number.to_string();
    let (mantissa, exponent) = match written.find(['e', 'E']) {
        Some(at) => (&written[..at], Some(&written[at..])),
        None => (written.as_str(), None),
    };
    if exponent.is_none() && !mantissa.contains('.') {
        // `as_i64` reads the written digits; a u64 above i64::MAX is far above 2^53 anyway.
        if number
            .as_i64()
            .is_some_and(|int| int.unsigned_abs() <= MAX_SAFE_INTEGER)
        {
            return Value::Number(number.clone());
        }
    } else if let Some(float) = number.as_f64()
        // An underflow to zero would send a different value, so it stays text.
        && (float != 0.0 || mantissa.bytes().all(|b| matches!(b, b'0' | b'.' | b'-')))
        && let Some(shortest) = Number::from_f64(float)
    {
        return Value::Number(shortest);
    }
    Value::String(cut(&written).to_owned())
}

/// Heap has no use for a property without a name, so an empty key is dropped.
fn insert(out: &mut Properties, key: String, value: Value) {
    if !key.is_empty() {
        out.insert(key, value);
    }
}

/// `prefix.name`, cut. `prefix` is already cut, and cutting a prefix that is already at the
/// limit is the same as cutting the whole key, so the cost per key stays bounded.
fn child_key(prefix: &str, name: &str) -> String {
    let mut key = String::with_capacity(prefix.len() + 1 + name.len().min(4 * MAX_CHARS));
    key.push_str(prefix);
    key.push('.');
    key.push_str(cut(name));
    cut(&key).to_owned()
}

fn join_scalars(items: &[Value]) -> String {
    let parts: Vec<Cow<'_, str>> = items
        .iter()
        .filter_map(|item| match item {
            Value::String(text) => Some(Cow::Borrowed(text.as_str())),
            // Text as written: joining makes a string, so nothing needs rounding.
            Value::Number(number) => Some(Cow::Owned(number.to_string())),
            Value::Bool(true) => Some(Cow::Borrowed("true")),
            Value::Bool(false) => Some(Cow::Borrowed("false")),
            _ => None,
        })
        .collect();
    cut(&parts.join("||")).to_owned()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    fn object(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            other => panic!("not an object: {other}"),
        }
    }

    fn flat(value: Value) -> Value {
        Value::Object(flatten(&object(value), &[]))
    }

    #[test]
    fn scalars_follow_heaps_rules() {
        let cases = [
            (json!({"n": 9}), json!({"n": 9})),
            (json!({"f": 4.5}), json!({"f": 4.5})),
            (json!({"neg": -3}), json!({"neg": -3})),
            (json!({"s": "hi"}), json!({"s": "hi"})),
            (json!({"empty": ""}), json!({"empty": ""})),
            (json!({"yes": true}), json!({"yes": "true"})),
            (json!({"no": false}), json!({"no": "false"})),
            (json!({"gone": null}), json!({})),
        ];
        for (input, expected) in cases {
            assert_eq!(flat(input.clone()), expected, "input {input}");
        }
    }

    /// `literal` parsed as serde_json parses a webhook body (exactly as written).
    fn number(literal: &str) -> Number {
        match serde_json::from_str(literal) {
            Ok(Value::Number(number)) => number,
            other => panic!("{literal} is not a number: {other:?}"),
        }
    }

    #[test]
    fn numbers_heap_reads_exactly_stay_numbers_and_any_other_number_becomes_its_text() {
        // (as written in the webhook, what Heap receives as JSON text)
        let cases = [
            ("0", "0"),
            ("-0", "-0"),
            ("42", "42"),
            ("-7", "-7"),
            ("9007199254740992", "9007199254740992"), // 2^53
            ("-9007199254740992", "-9007199254740992"), // -2^53
            ("9007199254740993", r#""9007199254740993""#),
            ("-9007199254740993", r#""-9007199254740993""#),
            ("18446744073709551615", r#""18446744073709551615""#),
            (
                "123456789012345678901234567890",
                r#""123456789012345678901234567890""#,
            ),
            ("4.5", "4.5"),
            ("1.50", "1.5"),
            ("1E2", "100.0"),
            ("1e+2", "100.0"),
            ("2.5e-3", "0.0025"),
            ("0.1", "0.1"),
            ("1e300", "1e+300"),
            ("1.7976931348623157e308", "1.7976931348623157e+308"), // f64::MAX
            ("5e-324", "5e-324"),                                  // the smallest float
            ("0.0", "0.0"),
            ("-0.0e10", "-0.0"),
            // serde_json spells an exponent `e+N` or `e-N`: the same number, written one way.
            ("1e400", r#""1e+400""#),
            ("-1e400", r#""-1e+400""#),
            ("1E400", r#""1e+400""#),
            ("1e-400", r#""1e-400""#),
            ("1.8e308", r#""1.8e+308""#),
        ];
        for (literal, expected) in cases {
            let sent = heap_number(&number(literal));
            assert_eq!(sent.to_string(), expected, "{literal}");
        }
    }

    #[test]
    fn numbers_inside_objects_and_arrays_follow_the_same_rule() {
        let input: Value = serde_json::from_str(
            r#"{"n": 1e400, "o": {"big": 123456789012345678901234567890, "ok": 7},
                "list": [1e400, 1.50, 9007199254740993]}"#,
        )
        .unwrap();
        assert_eq!(
            flat(input).to_string(),
            r#"{"list":"1e+400||1.50||9007199254740993","n":"1e+400","o.big":"123456789012345678901234567890","o.ok":7}"#
        );
    }

    #[test]
    fn a_number_written_longer_than_heaps_limit_is_cut_like_any_string() {
        let literal = format!("1{}", "0".repeat(2000));
        let sent = heap_number(&number(&literal));
        assert_eq!(sent, Value::String(literal[..MAX_CHARS].to_owned()));
    }

    #[test]
    fn nested_objects_become_dotted_keys() {
        let input = json!({"a": {"b": {"c": 1, "d": "x", "e": null}, "f": false}, "g": {}});
        assert_eq!(
            flat(input),
            json!({"a.b.c": 1, "a.b.d": "x", "a.f": "false"})
        );
    }

    #[test]
    fn arrays_of_scalars_are_joined_with_double_pipes() {
        let cases = [
            (json!({"tags": ["a", "b", "c"]}), json!({"tags": "a||b||c"})),
            (
                json!({"mixed": ["a", 1, 2.5, true, false]}),
                json!({"mixed": "a||1||2.5||true||false"}),
            ),
            (
                json!({"holes": [null, "a", null, "b"]}),
                json!({"holes": "a||b"}),
            ),
            (json!({"one": [7]}), json!({"one": "7"})),
            (json!({"empty": []}), json!({})),
            (json!({"nulls": [null, null]}), json!({})),
            (json!({"blank": [""]}), json!({})),
        ];
        for (input, expected) in cases {
            assert_eq!(flat(input.clone()), expected, "input {input}");
        }
    }

    #[test]
    fn arrays_holding_objects_or_arrays_are_flattened_by_index() {
        let input = json!({
            "answers": [
                {"question": "Why?", "answer": "Because", "skipped": false},
                {"question": "Rate", "answer": 5, "note": null},
                "loose",
                null,
                [1, 2]
            ]
        });
        assert_eq!(
            flat(input),
            json!({
                "answers.0.question": "Why?",
                "answers.0.answer": "Because",
                "answers.0.skipped": "false",
                "answers.1.question": "Rate",
                "answers.1.answer": 5,
                "answers.2": "loose",
                "answers.4": "1||2"
            })
        );
    }

    #[test]
    fn skipped_keys_are_left_out_only_at_the_top_level() {
        let input = object(json!({"user": {"id": 1}, "company": "c", "keep": {"user": "u"}}));
        assert_eq!(
            Value::Object(flatten(&input, &["user", "company"])),
            json!({"keep.user": "u"})
        );
    }

    #[test]
    fn strings_are_cut_to_1023_characters_without_splitting_a_character() {
        let ascii = "a".repeat(2000);
        let multibyte = "é".repeat(1500); // two bytes each
        let emoji = format!("{}{}", "x".repeat(1022), "😀😀"); // 1024 chars, 4-byte tail
        let fits = "ü".repeat(1023);
        let input = json!({"ascii": ascii, "multibyte": multibyte, "emoji": emoji, "fits": fits});
        let out = flatten(&object(input), &[]);
        assert_eq!(out["ascii"], Value::String("a".repeat(1023)));
        assert_eq!(out["multibyte"], Value::String("é".repeat(1023)));
        assert_eq!(
            out["emoji"],
            Value::String(format!("{}😀", "x".repeat(1022)))
        );
        assert_eq!(out["fits"], Value::String("ü".repeat(1023)));
    }

    #[test]
    fn joined_arrays_are_cut_to_1023_characters() {
        let items: Vec<String> = (0..400).map(|_| "ñño".to_owned()).collect();
        let out = flatten(&object(json!({"list": items})), &[]);
        let joined = out["list"].as_str().unwrap();
        assert_eq!(joined.chars().count(), 1023);
        assert!(joined.starts_with("ñño||ñño||"));
    }

    #[test]
    fn keys_are_cut_to_1023_characters() {
        let long = "k".repeat(1500);
        let nested_prefix = "p".repeat(1020);
        let cyrillic = "ключ".repeat(300);
        let input = json!({ long: 1, nested_prefix.clone(): {"child": 2}, cyrillic.clone(): 3 });
        let out = flatten(&object(input), &[]);
        assert_eq!(out["k".repeat(1023).as_str()], json!(1));
        assert_eq!(out[format!("{nested_prefix}.ch").as_str()], json!(2));
        assert_eq!(
            out["ключ"
                .repeat(300)
                .chars()
                .take(1023)
                .collect::<String>()
                .as_str()],
            json!(3)
        );
        assert!(out.keys().all(|key| key.chars().count() <= MAX_CHARS));
    }

    #[test]
    fn empty_keys_are_dropped_but_empty_segments_inside_a_key_are_kept() {
        assert_eq!(flat(json!({"": 1, "a": {"": 2}})), json!({"a.": 2}));
    }

    /// An object nested `levels` deep whose innermost value is `leaf`, built without recursion.
    fn nested(levels: usize, leaf: Value) -> Value {
        (1..levels).fold(leaf, |inner, _| json!({ "k": inner }))
    }

    #[test]
    fn content_deeper_than_the_limit_is_dropped() {
        // The outermost level is the map itself, so the leaf of `nested(MAX_DEPTH + 1, ..)` is
        // at level MAX_DEPTH.
        let at_limit = flatten(&object(nested(MAX_DEPTH + 1, json!("deep"))), &[]);
        let key_at_limit = vec!["k"; MAX_DEPTH].join(".");
        assert_eq!(Value::Object(at_limit), json!({ key_at_limit: "deep" }));

        let too_deep = flatten(&object(nested(MAX_DEPTH + 2, json!("deeper"))), &[]);
        assert!(too_deep.is_empty(), "{too_deep:?}");

        // Hostile depth does not reach the stack: only 32 levels are ever walked.
        let hostile = flatten(&object(nested(1_000, json!([1, 2]))), &[]);
        assert!(hostile.is_empty());
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            // Any number as written, including ones beyond f64 and beyond 2^53.
            "-?(0|[1-9][0-9]{0,30})(\\.[0-9]{1,20})?([eE][+-]?[0-9]{1,4})?"
                .prop_map(|literal| Value::Number(number(&literal))),
            "\\PC{0,12}".prop_map(Value::String),
            (any::<char>(), 1000..1100usize)
                .prop_map(|(c, n)| Value::String(c.to_string().repeat(n))),
        ];
        leaf.prop_recursive(6, 128, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                prop::collection::btree_map(json_key(), inner, 0..8)
                    .prop_map(|map| Value::Object(map.into_iter().collect())),
            ]
        })
    }

    fn json_key() -> impl Strategy<Value = String> {
        prop_oneof![
            "\\PC{0,8}",
            (any::<char>(), 300..1100usize).prop_map(|(c, n)| c.to_string().repeat(n)),
        ]
    }

    proptest! {
        #[test]
        fn flatten_never_panics_and_only_emits_what_heap_accepts(
            input in prop::collection::btree_map(json_key(), json_value(), 0..8),
            skip_first in any::<bool>(),
        ) {
            let input: Map<String, Value> = input.into_iter().collect();
            let skip: Vec<&str> =
                input.keys().take(usize::from(skip_first)).map(String::as_str).collect();
            let out = flatten(&input, &skip);
            for (key, value) in &out {
                prop_assert!(!key.is_empty());
                prop_assert!(key.chars().count() <= MAX_CHARS, "key {key:?} too long");
                match value {
                    Value::String(text) => prop_assert!(text.chars().count() <= MAX_CHARS),
                    Value::Number(number) => prop_assert!(
                        number.as_f64().is_some()
                            && number.as_i64().is_none_or(|n| n.unsigned_abs() <= MAX_SAFE_INTEGER),
                        "{key} holds {number}, which Heap cannot read exactly"
                    ),
                    other => prop_assert!(false, "{key} holds {other}"),
                }
            }
            // Skipping a key is the same as not having it.
            let mut without = input.clone();
            for key in &skip {
                without.remove(*key);
            }
            prop_assert_eq!(&out, &flatten(&without, &[]));
        }
    }
}
