use proptest::prelude::*;

use super::*;

fn kv(s: &str) -> Value {
    Value::Keyval(s.into())
}

fn map<const N: usize>(entries: [(&str, Value); N]) -> Map {
    entries
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
}

fn ok(params: &str) -> Map {
    parse(params, None).unwrap_or_else(|e| panic!("{params}: {e}"))
}

fn err(params: &str) -> String {
    parse(params, None).unwrap_err().to_string()
}

#[test]
fn pairs_become_members() {
    assert_eq!(ok("a=b,c=d"), map([("a", kv("b")), ("c", kv("d"))]));
}

#[test]
fn empty_input_is_empty_object() {
    assert_eq!(ok(""), Map::new());
    assert_eq!(parse("", Some("driver")).unwrap(), Map::new());
}

#[test]
fn trailing_comma_is_allowed() {
    assert_eq!(ok("a=b,"), map([("a", kv("b"))]));
}

#[test]
fn dots_nest_into_objects() {
    let inner = map([("d", kv("e")), ("f", kv("g"))]);
    assert_eq!(ok("c.d=e,c.f=g"), map([("c", Value::Map(inner))]));
}

#[test]
fn double_comma_is_a_literal_comma() {
    assert_eq!(ok("a=x,,y,b=,,"), map([("a", kv("x,y")), ("b", kv(","))]));
    assert_eq!(ok("a=,,,,"), map([("a", kv(",,"))]));
}

#[test]
fn values_may_hold_equals_dots_and_be_empty() {
    assert_eq!(ok("a=b=c.d,e="), map([("a", kv("b=c.d")), ("e", kv(""))]));
}

#[test]
fn implied_key_takes_first_element_without_equals() {
    let m = parse("file,filename=x", Some("driver")).unwrap();
    assert_eq!(m, map([("driver", kv("file")), ("filename", kv("x"))]));
}

#[test]
fn implied_key_is_not_used_when_first_element_has_equals() {
    let m = parse("driver=file", Some("driver")).unwrap();
    assert_eq!(m, map([("driver", kv("file"))]));
}

#[test]
fn implied_key_only_for_the_first_element() {
    let e = parse("a=1,file", Some("driver")).unwrap_err();
    assert_eq!(e.to_string(), "Expected '=' after parameter 'file'");
}

#[test]
fn implied_value_ends_at_first_comma() {
    let e = parse("a,,b,c=d", Some("driver")).unwrap_err();
    assert_eq!(e.to_string(), "Invalid parameter ''");
}

#[test]
fn implied_and_explicit_key_together_is_repeated() {
    let e = parse("file,driver=raw", Some("driver")).unwrap_err();
    assert_eq!(e.to_string(), "Parameter 'driver' is set more than once");
}

#[test]
fn element_without_equals_needs_implied_key() {
    assert_eq!(err("file"), "Expected '=' after parameter 'file'");
    assert_eq!(err("a=1,foo"), "Expected '=' after parameter 'foo'");
    assert_eq!(err("a.b,c=1"), "Expected '=' after parameter 'a.b'");
}

#[test]
fn invalid_key_fragments_are_refused() {
    for key in [
        "", "1a", "a..b", "a.", ".a", "a b", "a.b c", "-a", "_a", "a.-b", "é",
    ] {
        let e = err(&format!("{key}=1"));
        assert_eq!(e, format!("Invalid parameter '{key}'"));
    }
    assert_eq!(err(",a=1"), "Invalid parameter ''");
}

#[test]
fn valid_key_fragments() {
    let m = ok("A-b_9=1,__com.redhat_x-y=2");
    assert_eq!(m, map([("A-b_9", kv("1")), ("__com.redhat_x-y", kv("2"))]));
}

#[test]
fn key_fragment_length_limit() {
    let long = "a".repeat(127);
    assert!(parse(&format!("{long}=1"), None).is_ok());
    let too_long = "a".repeat(128);
    let e = err(&format!("{too_long}=1"));
    assert_eq!(e, format!("Parameter '{too_long}' is too long"));
    let e = err(&format!("x.{too_long}=1"));
    assert_eq!(e, format!("Parameter fragment '{too_long}' is too long"));
}

#[test]
fn nesting_depth_is_limited() {
    let ok_key = vec!["a"; MAX_DEPTH].join(".");
    assert!(parse(&format!("{ok_key}=1"), None).is_ok());
    let deep = vec!["a"; MAX_DEPTH + 1].join(".");
    let e = err(&format!("{deep}=1"));
    assert_eq!(e, format!("Parameter '{deep}' is nested too deeply"));
}

#[test]
fn scalar_then_object_is_inconsistent() {
    assert_eq!(err("a=1,a.b=2"), "Parameters 'a.*' used inconsistently");
    assert_eq!(err("a.b=2,a=1"), "Parameters 'a.*' used inconsistently");
    assert_eq!(
        err("x.a=1,x.a.b=2"),
        "Parameters 'x.a.*' used inconsistently"
    );
}

#[test]
fn repeated_key_is_an_error() {
    assert_eq!(err("a=1,a=2"), "Parameter 'a' is set more than once");
    assert_eq!(
        err("a.b=1,c=0,a.b=1"),
        "Parameter 'a.b' is set more than once"
    );
}

#[test]
fn numeric_fragments_make_lists() {
    let m = ok("a.1=y,a.0=x");
    assert_eq!(m, map([("a", Value::List(vec![kv("x"), kv("y")]))]));
    let m = ok("a.0.b=1,a.0.c=2");
    let element = Value::Map(map([("b", kv("1")), ("c", kv("2"))]));
    assert_eq!(m, map([("a", Value::List(vec![element]))]));
}

#[test]
fn list_gaps_and_mixed_keys_are_refused() {
    assert_eq!(err("a.1=y"), "Parameter 'a.0' missing");
    assert_eq!(err("a.0=x,a.2=z"), "Parameter 'a.1' missing");
    assert_eq!(err("a.0=x,a.b=y"), "Parameters 'a.*' used inconsistently");
    assert_eq!(err("a.b.0=x,a.b.1a=y"), "Invalid parameter 'a.b.1a'");
}

#[test]
fn help_is_not_available() {
    assert_eq!(err("help"), "Help is not available for this option");
    assert_eq!(
        parse("file,?", Some("driver")).unwrap_err(),
        QapiError::HelpNotAvailable
    );
    assert_eq!(ok("help=1"), map([("help", kv("1"))]));
}

fn escape(value: &str) -> String {
    value.replace(',', ",,")
}

proptest! {
    #[test]
    fn never_panics(params in any::<String>(), implied in any::<bool>()) {
        let _ = parse(&params, implied.then_some("driver"));
    }

    #[test]
    fn never_panics_on_syntax_soup(params in "[a-c0-2.,=?_-]{0,30}") {
        let _ = parse(&params, Some("driver"));
    }

    #[test]
    fn rendered_maps_parse_back(
        entries in prop::collection::btree_map("[a-z][a-z0-9_-]{0,8}", ".*", 0..8)
    ) {
        let params: Vec<String> =
            entries.iter().map(|(k, v)| format!("{k}={}", escape(v))).collect();
        let parsed = parse(&params.join(","), None).unwrap();
        let expected: Map = entries.into_iter().map(|(k, v)| (k, Value::Keyval(v))).collect();
        prop_assert_eq!(parsed, expected);
    }

    #[test]
    fn implied_value_parses_back(value in "[^=,]+", rest in ".*") {
        prop_assume!(value != "help" && value != "?");
        let parsed = parse(&format!("{value},x={}", escape(&rest)), Some("driver")).unwrap();
        prop_assert_eq!(parsed.get("driver"), Some(&Value::Keyval(value)));
        prop_assert_eq!(parsed.get("x"), Some(&Value::Keyval(rest)));
    }
}
