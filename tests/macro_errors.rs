//! The macros' compile errors: each mistake is reported at its span with what to do.
//! Snapshots in `ui/*.stderr` (regenerate with TRYBUILD=overwrite and review).

#[test]
fn macro_mistakes_are_compile_errors() {
    let t = trybuild::TestCases::new();
    t.compile_fail("ui/*.rs");
}
