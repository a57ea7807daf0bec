use serde::Deserialize;
use serde_json::json;

use super::*;
use crate::keyval;

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct Opts {
    #[serde(default)]
    count: u64,
    #[serde(default)]
    small: u8,
    #[serde(default)]
    delta: i32,
    #[serde(default)]
    ratio: f64,
    #[serde(default)]
    flag: bool,
    name: Option<String>,
    mode: Option<Mode>,
    inner: Option<Inner>,
    #[serde(default)]
    items: Vec<Inner>,
}

#[derive(Debug, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
enum Mode {
    Fast,
    Slow,
}

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct Inner {
    level: u32,
}

fn from_keyval<T: DeserializeOwned>(params: &str) -> Result<T, QapiError> {
    from_value(&Value::Map(keyval::parse(params, None)?))
}

fn from_json<T: DeserializeOwned>(json: serde_json::Value) -> Result<T, QapiError> {
    from_value(&Value::from(json))
}

fn keyval_err(params: &str) -> String {
    from_keyval::<Opts>(params).unwrap_err().to_string()
}

fn json_err(json: serde_json::Value) -> String {
    from_json::<Opts>(json).unwrap_err().to_string()
}

#[test]
fn keyval_scalars_are_typed_on_demand() {
    let o: Opts =
        from_keyval("count=0x10,small=255,delta=-7,ratio=0.5,flag=true,name=n,mode=slow").unwrap();
    let expected = Opts {
        count: 16,
        small: 255,
        delta: -7,
        ratio: 0.5,
        flag: true,
        name: Some("n".into()),
        mode: Some(Mode::Slow),
        ..Default::default()
    };
    assert_eq!(o, expected);
}

#[test]
fn keyval_and_json_reach_the_same_struct() {
    let k: Opts =
        from_keyval("count=5,flag=off,inner.level=2,items.0.level=1,items.1.level=3").unwrap();
    let j: Opts = from_json(json!({
        "count": 5, "flag": false, "inner": {"level": 2},
        "items": [{"level": 1}, {"level": 3}]
    }))
    .unwrap();
    assert_eq!(k, j);
    assert_eq!(k.items, vec![Inner { level: 1 }, Inner { level: 3 }]);
}

#[test]
fn keyval_bool_takes_on_off_true_false_only() {
    for (text, b) in [
        ("on", true),
        ("true", true),
        ("off", false),
        ("false", false),
    ] {
        let o: Opts = from_keyval(&format!("flag={text}")).unwrap();
        assert_eq!(o.flag, b);
    }
    for text in ["yes", "1", "ON", ""] {
        let e = keyval_err(&format!("flag={text}"));
        assert_eq!(e, "Parameter 'flag' expects 'on' or 'off'");
    }
}

#[test]
fn keyval_bad_numbers() {
    for text in [
        "",
        "x",
        "1k",
        "-1",
        "0x",
        "0xg",
        "18446744073709551616",
        " 1",
    ] {
        let e = keyval_err(&format!("count={text}"));
        assert_eq!(e, "Parameter 'count' expects a number", "{text:?}");
    }
    assert_eq!(
        keyval_err("delta=--1"),
        "Parameter 'delta' expects a number"
    );
    assert_eq!(
        keyval_err("ratio=inf"),
        "Parameter 'ratio' expects a number"
    );
    assert_eq!(keyval_err("small=256"), "Parameter 'small' expects u8");
    assert_eq!(
        keyval_err("delta=3000000000"),
        "Parameter 'delta' expects i32"
    );
}

#[test]
fn keyval_bad_enum_value() {
    let e = keyval_err("mode=medium");
    assert_eq!(e, "Parameter 'mode' does not accept value 'medium'");
}

#[test]
fn errors_carry_the_dotted_path() {
    assert_eq!(
        keyval_err("inner.level=x"),
        "Parameter 'inner.level' expects a number"
    );
    assert_eq!(
        keyval_err("inner.bogus=1"),
        "Invalid parameter 'inner.bogus'"
    );
    assert_eq!(keyval_err("items.0.x=1"), "Invalid parameter 'items.0.x'");
    assert_eq!(
        keyval_err("items.0.level=1,items.1.z=2"),
        "Invalid parameter 'items.1.z'"
    );
    assert_eq!(keyval_err("inner.x=1"), "Invalid parameter 'inner.x'");
    let e = from_keyval::<Opts>("items.0.x=1").unwrap_err();
    assert_eq!(e.key(), Some("items.0.x"));
}

#[test]
fn missing_member_in_nested_struct() {
    let e = from_json::<Opts>(json!({"inner": {}})).unwrap_err();
    assert_eq!(e.to_string(), "Parameter 'inner.level' is missing");
    assert_eq!(
        e,
        QapiError::Missing {
            key: "inner.level".into()
        }
    );
}

#[test]
fn json_scalars_are_strict() {
    assert_eq!(
        json_err(json!({"flag": "on"})),
        "Invalid parameter type for 'flag', expected: boolean"
    );
    assert_eq!(
        json_err(json!({"count": "5"})),
        "Invalid parameter type for 'count', expected: integer"
    );
    assert_eq!(
        json_err(json!({"ratio": "0.5"})),
        "Invalid parameter type for 'ratio', expected: number"
    );
    assert_eq!(
        json_err(json!({"name": 5})),
        "Invalid parameter type for 'name', expected: string"
    );
    assert_eq!(
        json_err(json!({"inner": "x"})),
        "Invalid parameter type for 'inner', expected: object"
    );
    assert_eq!(
        json_err(json!({"items": {"level": 1}})),
        "Invalid parameter type for 'items', expected: array"
    );
    assert_eq!(
        json_err(json!({"mode": 1})),
        "Invalid parameter type for 'mode', expected: string"
    );
}

#[test]
fn keyval_object_where_scalar_expected_is_a_type_error() {
    assert_eq!(
        keyval_err("count.x=1"),
        "Invalid parameter type for 'count', expected: integer"
    );
    assert_eq!(
        keyval_err("inner=1"),
        "Invalid parameter type for 'inner', expected: object"
    );
}

#[test]
fn json_null_is_none_for_options() {
    let o: Opts = from_json(json!({"name": null, "count": 1})).unwrap();
    assert_eq!(o.name, None);
    assert_eq!(o.count, 1);
}

#[test]
fn json_integers_fit_their_type() {
    let o: Opts = from_json(json!({"delta": -5, "small": 7, "ratio": 2})).unwrap();
    assert_eq!((o.delta, o.small, o.ratio), (-5, 7, 2.0));
    assert_eq!(
        json_err(json!({"small": 300})),
        "Parameter 'small' expects u8"
    );
}

#[test]
fn deserialize_any_sees_keyval_leaves_as_strings() {
    let v: serde_json::Value = from_keyval("a=1,b.c=on").unwrap();
    assert_eq!(v, json!({"a": "1", "b": {"c": "on"}}));
}

#[test]
fn value_round_trips_through_the_deserializer() {
    let tree = Value::Map(keyval::parse("a=1,b.0=x", None).unwrap());
    let back: Value = from_value(&tree).unwrap();
    assert_eq!(back, tree);
    let json_tree = Value::from(json!({"a": [1, true, null, "s", 1.5], "b": {}}));
    let back: Value = from_value(&json_tree).unwrap();
    assert_eq!(back, json_tree);
}

#[test]
fn custom_errors_get_the_path() {
    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Wrapper {
        inner: Picky,
    }
    #[derive(Debug)]
    struct Picky;
    impl<'de> Deserialize<'de> for Picky {
        fn deserialize<D: serde::Deserializer<'de>>(_: D) -> Result<Self, D::Error> {
            Err(serde::de::Error::custom("too picky"))
        }
    }
    let e = from_keyval::<Wrapper>("inner=1").unwrap_err();
    assert_eq!(e.to_string(), "Parameter 'inner': too picky");
}
