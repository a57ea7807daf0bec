//! QEMU's `KEY=VALUE,...` syntax, parsed the way QEMU's `util/keyval.c`
//! parses it, so that a `--blockdev`/`--object`/`--device` string means the
//! same to us as to QEMU:
//!
//! ```text
//! key-vals     = [ key-val { ',' key-val } [ ',' ] ]
//! key-val      = key '=' val
//! key          = key-fragment { '.' key-fragment }
//! val          = { / [^,]* / | ',,' }
//! key-vals-ik  = val-no-key [ ',' key-vals ]      (with an implied key)
//! val-no-key   = / [^=,]* /
//! ```
//!
//! - Dots nest: `a.b=1,a.c=2` is `{"a": {"b": "1", "c": "2"}}`; fragments
//!   that are all digits (not the first) make lists: `a.0=x,a.1=y` is
//!   `{"a": ["x", "y"]}`, and the indexes must have no gap.
//! - `,,` is a literal comma in a value.
//! - With an implied key, the first element may omit `key=` if it has no
//!   `=`: with `driver` implied, `file,filename=x` is
//!   `driver=file,filename=x`. The implied value ends at the first comma.
//! - A key fragment is a QAPI name (a letter, then letters, digits, `-`,
//!   `_`; or QEMU's downstream `__RFQDN_name` form) of at most 127
//!   characters.
//! - Leaves are [`Value::Keyval`]: text typed later by [`crate::de`].
//!
//! One deliberate difference: QEMU lets a repeated key override the earlier
//! one; we refuse it (`Parameter 'x' is set more than once`), because on a
//! command line a repeated key is a mistake far more often than intent. We
//! also refuse keys nested deeper than [`MAX_DEPTH`], so that no input can
//! exhaust the stack.

use std::collections::btree_map::Entry;

use crate::error::{join, QapiError};
use crate::value::{Map, Value};

/// Longest key fragment QEMU accepts plus one (`key_in_cur[128]`).
const MAX_FRAGMENT: usize = 128;
/// Most fragments in one key.
pub const MAX_DEPTH: usize = 32;

/// Parses `params`; `implied_key` names the key of a first element that has
/// no `=` (`Some("driver")` for `--blockdev`).
pub fn parse(params: &str, implied_key: Option<&str>) -> Result<Map, QapiError> {
    let mut root = Map::new();
    let mut help = false;
    let mut implied_key = implied_key;
    let mut rest = params;
    while !rest.is_empty() {
        rest = parse_one(&mut root, rest, implied_key.take(), &mut help)?;
    }
    if help {
        return Err(QapiError::HelpNotAvailable);
    }
    for (key, value) in root.iter_mut() {
        listify(value, key)?;
    }
    Ok(root)
}

/// Parses one element at the start of `params`, returns what follows it.
fn parse_one<'a>(
    root: &mut Map,
    params: &'a str,
    implied_key: Option<&str>,
    help: &mut bool,
) -> Result<&'a str, QapiError> {
    let len = params.find(['=', ',']).unwrap_or(params.len());
    let (head, after) = params.split_at(len);
    if !head.is_empty() && !after.starts_with('=') {
        if head == "help" || head == "?" {
            *help = true;
            return Ok(after.strip_prefix(',').unwrap_or(after));
        }
        if let Some(key) = implied_key {
            put(root, key, &fragments(key)?, head.to_owned())?;
            return Ok(after.strip_prefix(',').unwrap_or(after));
        }
    }
    let frags = fragments(head)?;
    let Some(after) = after.strip_prefix('=') else {
        return Err(QapiError::ExpectedEquals { key: head.into() });
    };
    let (value, rest) = value(after);
    put(root, head, &frags, value)?;
    Ok(rest)
}

/// Reads a value up to a lone comma, undoubling `,,`.
fn value(s: &str) -> (String, &str) {
    let mut value = String::new();
    let mut rest = s;
    while let Some(i) = rest.find(',') {
        value.push_str(&rest[..i]);
        rest = &rest[i + 1..];
        match rest.strip_prefix(',') {
            Some(r) => {
                value.push(',');
                rest = r;
            }
            None => return (value, rest),
        }
    }
    value.push_str(rest);
    (value, "")
}

/// Splits and checks a key as `keyval_parse_one` does.
fn fragments(key: &str) -> Result<Vec<&str>, QapiError> {
    let mut frags = Vec::new();
    let mut s = 0;
    loop {
        let rest = &key[s..];
        let len = if s != 0 && rest.starts_with(|c: char| c.is_ascii_digit()) {
            rest.bytes().take_while(u8::is_ascii_digit).count()
        } else {
            qapi_name_len(rest)
        };
        if len == 0 || (len < rest.len() && !rest[len..].starts_with('.')) {
            return Err(QapiError::InvalidParameter { key: key.into() });
        }
        if len >= MAX_FRAGMENT {
            let frag = rest[..len].to_owned();
            return Err(if len == key.len() {
                QapiError::TooLong { key: frag }
            } else {
                QapiError::FragmentTooLong { key: frag }
            });
        }
        frags.push(&rest[..len]);
        if frags.len() > MAX_DEPTH {
            return Err(QapiError::TooDeep { key: key.into() });
        }
        s += len;
        if s == key.len() {
            return Ok(frags);
        }
        s += 1; // the '.'
    }
}

/// Length of the QAPI name at the start of `s` (`parse_qapi_name`), 0 if none.
fn qapi_name_len(s: &str) -> usize {
    let b = s.as_bytes();
    let mut p = 0;
    if b.first() == Some(&b'_') {
        // Downstream extension: __RFQDN_name.
        if b.get(1) != Some(&b'_') {
            return 0;
        }
        p = 2;
        while b
            .get(p)
            .is_some_and(|c| c.is_ascii_alphanumeric() || b"-.".contains(c))
        {
            p += 1;
        }
        if b.get(p) != Some(&b'_') {
            return 0;
        }
        p += 1;
    }
    if !b.get(p).is_some_and(u8::is_ascii_alphabetic) {
        return 0;
    }
    p += 1;
    while b
        .get(p)
        .is_some_and(|c| c.is_ascii_alphanumeric() || b"-_".contains(c))
    {
        p += 1;
    }
    p
}

/// Stores `value` under the path `frags` (`keyval_parse_put`).
fn put(root: &mut Map, key: &str, frags: &[&str], value: String) -> Result<(), QapiError> {
    let Some((last, parents)) = frags.split_last() else {
        return Err(QapiError::InvalidParameter { key: key.into() });
    };
    let mut cur = root;
    for (i, frag) in parents.iter().enumerate() {
        let node = cur
            .entry((*frag).to_owned())
            .or_insert_with(|| Value::Map(Map::new()));
        cur = match node {
            Value::Map(map) => map,
            _ => {
                let key = frags[..=i].join(".");
                return Err(QapiError::Inconsistent { key });
            }
        };
    }
    match cur.entry((*last).to_owned()) {
        Entry::Vacant(slot) => {
            slot.insert(Value::Keyval(value));
            Ok(())
        }
        Entry::Occupied(old) => Err(match old.get() {
            Value::Keyval(_) => QapiError::Repeated { key: key.into() },
            _ => QapiError::Inconsistent { key: key.into() },
        }),
    }
}

/// Turns objects whose keys are all indexes into lists (`keyval_listify`).
/// `path` is the dotted key of `value`.
fn listify(value: &mut Value, path: &str) -> Result<(), QapiError> {
    let Value::Map(map) = value else {
        return Ok(());
    };
    for (key, child) in map.iter_mut() {
        listify(child, &join(path, key))?;
    }
    let is_index = |k: &String| k.starts_with(|c: char| c.is_ascii_digit());
    let indexes = map.keys().filter(|k| is_index(k)).count();
    if indexes == 0 {
        return Ok(());
    }
    if indexes != map.len() {
        return Err(QapiError::Inconsistent { key: path.into() });
    }
    // As QEMU: an index at or beyond the element count leaves a gap, and
    // "01" and "1" are the same index.
    let n = map.len();
    let mut elements: Vec<Option<Value>> = vec![None; n];
    let mut max = 0;
    for (key, child) in std::mem::take(map) {
        let index = key.parse::<usize>().unwrap_or(usize::MAX);
        max = max.max(index);
        if let Some(slot) = elements.get_mut(index) {
            *slot = Some(child);
        }
    }
    let mut list = Vec::with_capacity(n);
    for (i, element) in elements.into_iter().take(max.saturating_add(1)).enumerate() {
        match element {
            Some(element) => list.push(element),
            None => {
                let key = join(path, &i.to_string());
                return Err(QapiError::MissingListElement { key });
            }
        }
    }
    *value = Value::List(list);
    Ok(())
}

#[cfg(test)]
mod tests;
