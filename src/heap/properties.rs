//! Heap's property rules (SPEC §2.4): flatten nested objects to `a.b.c` keys; keep numbers and
//! strings; booleans become `"true"`/`"false"`; nulls are dropped; arrays of scalars are joined
//! with `||`; strings and keys are cut to 1023 characters. Pure.

use serde_json::{Map, Value};

use crate::heap::wire::Properties;

/// Flattens `object` into Heap properties, leaving out the top-level keys in `skip`.
pub fn flatten(object: &Map<String, Value>, skip: &[&str]) -> Properties {
    todo!("{object:?}{skip:?}")
}
