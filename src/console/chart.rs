//! Samples drawn as SVG (no script, no library): a polyline per series in a fixed view box,
//! styled by the console's stylesheet.
