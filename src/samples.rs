//! Realistic sample webhooks of every event kind, in the shapes contract §2.2 accepts. Used by
//! `send-test` to check a deployment end to end, and by the tests and the benchmark.

use serde_json::{Value, json};

/// One sample per event kind of contract §2.3: `(label, body)`. `nonce` makes each body unique
/// (so redelivery deduplication does not swallow a second run); `now` is unix seconds.
pub fn all(user_id: &str, now: i64, nonce: &str) -> Vec<(&'static str, Value)> {
    let user =
        json!({ "user_id": user_id, "email": format!("{user_id}@example.com"), "plan": "pro" });
    let with = |data: Value| -> Value {
        let mut data = data;
        data["user"] = user.clone();
        data["hostname"] = json!("app.example.com");
        data["sample"] = json!(nonce);
        json!({ "timestamp": now, "data": data })
    };
    vec![
        (
            "experience started",
            with(
                json!({ "type": "flow", "action": "started", "flow_id": "fl_1", "flow_name": "Onboarding" }),
            ),
        ),
        (
            "experience step",
            with(json!({ "type": "flow", "action": "step", "flow_id": "fl_1", "step": 2 })),
        ),
        (
            "experience completed",
            with(json!({ "type": "flow", "action": "completed", "flow_id": "fl_1" })),
        ),
        (
            "experience dismissed",
            with(json!({ "type": "experience", "action": "dismissed", "experience_id": "fl_1" })),
        ),
        (
            "checklist started",
            with(json!({ "type": "checklist", "action": "started", "checklist_id": "ck_1" })),
        ),
        (
            "checklist task completed",
            with(
                json!({ "type": "checklist", "action": "task_completed", "checklist_id": "ck_1", "task": "Invite a teammate" }),
            ),
        ),
        (
            "checklist completed",
            with(json!({ "type": "checklist", "action": "completed", "checklist_id": "ck_1" })),
        ),
        (
            "checklist dismissed",
            with(json!({ "type": "checklist", "action": "dismissed", "checklist_id": "ck_1" })),
        ),
        (
            "nps score and feedback",
            with(json!({ "type": "nps", "score": 9, "feedback": "Love it" })),
        ),
        (
            "nps ask later",
            with(json!({ "type": "nps", "action": "dismissed" })),
        ),
        (
            "form submitted",
            with(
                json!({ "type": "form", "action": "submitted", "form_id": "fm_1", "answers": [{ "question": "Role?", "answer": "PM" }] }),
            ),
        ),
        (
            "feature tag click",
            with(
                json!({ "type": "feature_tag", "action": "click", "feature_id": "ft_1", "feature_name": "Export" }),
            ),
        ),
        (
            "feature tag hover",
            with(json!({ "type": "feature_tag", "action": "hover", "feature_id": "ft_1" })),
        ),
        (
            "feature tag text input",
            with(json!({ "type": "feature_tag", "action": "text_input", "feature_id": "ft_2" })),
        ),
        (
            "tracked event",
            with(json!({ "type": "track", "event_name": "Clicked Upgrade" })),
        ),
    ]
}
