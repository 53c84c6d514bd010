//! The Heap part of erasures (contract §12): asks Heap to delete the users of recorded
//! erasures whose source has an `api_key` — an auth token with Basic `app_id:api_key`, then
//! one `user_deletion` request per app id for up to 10,000 users — retries failures like
//! events, and follows each request's `deletion_status` until Heap says it is complete.
//! The work is in the queue (`erasures`), so a restart resumes it.
//!
//! BASE SKELETON: the helper owning this module implements it.
