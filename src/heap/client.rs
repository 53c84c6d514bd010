//! The HTTP client that posts bulk requests to Heap.
