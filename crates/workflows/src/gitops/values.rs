//! Changing one scalar of a YAML file in place: the rest of the file (comments, key order,
//! quoting, blank lines, anchors, other documents) stays byte for byte as it was, so the commit
//! diff is the changed line alone.
//!
//! The value is found by a scan of the block structure (the style of Helm values files and
//! kustomizations), then replaced inside its line in the quoting style it had. The result is
//! then checked semantically: parsed, it must equal the old file with only that value changed;
//! if not (an alias shares the value, say), nothing is changed and the error says why.
//!
//! Paths are dotted keys (`api-gateway.image.tag`); a sequence item is selected by one of its
//! keys (`images.[name=ghcr.io/acme/api].newTag`).

use serde_json::Value;

dayshift_engine::message_error!(
    /// What is wrong with a values file, or with the key path to edit in it.
    ValuesError
);

/// What [`set`] changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// 1-based line number.
    pub line: usize,
    pub old: String,
    pub new: String,
}

/// A path segment: a mapping key, or a sequence item chosen by a key's value.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Key(String),
    Item { key: String, value: String },
}

impl std::fmt::Display for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Key(k) => f.write_str(k),
            Self::Item { key, value } => write!(f, "[{key}={value}]"),
        }
    }
}

fn show(path: &[Segment]) -> String {
    path.iter().map(ToString::to_string).collect::<Vec<_>>().join(".")
}

/// Parses `a.b.[name=x.y].c`: dots inside brackets belong to the value.
fn parse_path(path: &str) -> Result<Vec<Segment>, ValuesError> {
    let mut out = Vec::new();
    let mut rest = path;
    while !rest.is_empty() {
        if let Some(inner) = rest.strip_prefix('[') {
            let end = inner
                .find(']')
                .ok_or_else(|| format!("key path {path:?}: an unclosed ["))?;
            let (key, value) = inner[..end]
                .split_once('=')
                .ok_or_else(|| format!("key path {path:?}: [{}] must be [key=value]", &inner[..end]))?;
            out.push(Segment::Item {
                key: key.to_string(),
                value: value.to_string(),
            });
            rest = &inner[end + 1..];
            rest = rest.strip_prefix('.').unwrap_or(rest);
        } else {
            let end = rest.find('.').unwrap_or(rest.len());
            if end == 0 {
                return Err(format!("key path {path:?}: an empty key").into());
            }
            out.push(Segment::Key(rest[..end].to_string()));
            rest = rest.get(end + 1..).unwrap_or("");
        }
    }
    if out.is_empty() {
        return Err("the key path is empty".into());
    }
    Ok(out)
}

/// A scalar found in the text: the line, the byte range of its text, and its style.
#[derive(Debug, Clone)]
struct Found {
    doc: usize,
    line: usize,
    start: usize,
    end: usize,
    style: Style,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Style {
    Plain,
    Single,
    Double,
}

/// An open mapping key or sequence item above the current line.
struct Frame {
    indent: usize,
    segment: Segment,
    /// A sequence item: its identity is learned from its keys.
    item: bool,
}

/// A mapping key at the start of `s`: the key and the text after the colon.
fn split_key(s: &str) -> Option<(String, &str)> {
    let (key, after) = if let Some(q) = s.strip_prefix('"') {
        let end = q.find('"')?;
        (q[..end].to_string(), &q[end + 1..])
    } else if let Some(q) = s.strip_prefix('\'') {
        let end = q.find('\'')?;
        (q[..end].to_string(), &q[end + 1..])
    } else {
        let end = s.find(": ").or_else(|| s.strip_suffix(':').map(|k| k.len()))?;
        let key = s[..end].trim_end();
        if key.is_empty() || key.starts_with(['#', '{', '[', '&', '*', '!', '|', '>']) {
            return None;
        }
        (key.to_string(), &s[end..])
    };
    let after = after.trim_start_matches(' ').strip_prefix(':')?;
    if !(after.is_empty() || after.starts_with(' ')) {
        return None;
    }
    Some((key, after))
}

/// The scalar in `rest` (the text after a key's colon, at byte `offset` of the file): its
/// range and style. `None` when there is no inline scalar (a nested block follows).
fn scalar_in(rest: &str, offset: usize) -> Result<Option<(usize, usize, Style)>, ValuesError> {
    let mut pos = rest.len() - rest.trim_start().len();
    let mut s = &rest[pos..];
    // An anchor and a tag may precede the value.
    while s.starts_with('&') || s.starts_with('!') {
        let end = s.find(' ').unwrap_or(s.len());
        pos += end;
        s = &rest[pos..];
        let ws = s.len() - s.trim_start().len();
        pos += ws;
        s = &rest[pos..];
    }
    if s.is_empty() || s.starts_with('#') {
        return Ok(None);
    }
    if s.starts_with('|') || s.starts_with('>') {
        return Err("is a block scalar (| or >), not a one-line value".into());
    }
    if s.starts_with('{') || s.starts_with('[') {
        return Err("is in flow style ({...} or [...]); only block style is edited".into());
    }
    if s.starts_with('*') {
        return Err("is an alias of another value; change the anchored value instead".into());
    }
    let start = offset + pos;
    if let Some(q) = s.strip_prefix('"') {
        let bytes = q.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'\\' => i += 2,
                b'"' => return Ok(Some((start, start + i + 2, Style::Double))),
                _ => i += 1,
            }
        }
        return Err("has a double-quoted value that does not end on its line".into());
    }
    if let Some(q) = s.strip_prefix('\'') {
        let bytes = q.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'\'' {
                if bytes.get(i + 1) == Some(&b'\'') {
                    i += 2;
                    continue;
                }
                return Ok(Some((start, start + i + 2, Style::Single)));
            }
            i += 1;
        }
        return Err("has a single-quoted value that does not end on its line".into());
    }
    let end = s.find(" #").unwrap_or(s.len());
    Ok(Some((start, start + s[..end].trim_end().len(), Style::Plain)))
}

/// Every place `path` is set in `text`, and the paths seen (for error messages).
fn locate(text: &str, path: &[Segment]) -> Result<(Vec<Found>, Vec<Vec<Segment>>), ValuesError> {
    let mut found = Vec::new();
    let mut seen: Vec<Vec<Segment>> = Vec::new();
    let mut stack: Vec<Frame> = Vec::new();
    let mut doc = 0;
    // Whether the current document has content: a `---` before any starts the first one.
    let mut in_doc = false;
    // Lines more indented than this belong to a block scalar being skipped.
    let mut block: Option<usize> = None;
    let mut offset = 0;
    for (n, raw) in text.split_inclusive('\n').enumerate() {
        let line_start = offset;
        offset += raw.len();
        let line = raw.trim_end_matches(['\n', '\r']);
        let content = line.trim_start_matches(' ');
        let mut indent = line.len() - content.len();
        if let Some(limit) = block {
            if content.is_empty() || indent > limit {
                continue;
            }
            block = None;
        }
        if content.is_empty() || content.starts_with('#') {
            continue;
        }
        if content == "---" || content.starts_with("--- ") || content == "..." {
            if in_doc {
                doc += 1;
                in_doc = false;
            }
            stack.clear();
            continue;
        }
        in_doc = true;
        if content.starts_with('\t') {
            return Err(format!("line {}: a tab in the indentation", n + 1).into());
        }
        let mut rest = content;
        // Sequence items: `- key: value` opens an item whose mapping is two columns in.
        while rest == "-" || rest.starts_with("- ") {
            while let Some(top) = stack.last() {
                if top.indent > indent || (top.indent == indent && top.item) {
                    stack.pop();
                } else {
                    break;
                }
            }
            stack.push(Frame {
                indent,
                segment: Segment::Key("[]".into()),
                item: true,
            });
            let after = rest[1..].trim_start_matches(' ');
            indent += rest.len() - after.len();
            rest = after;
        }
        let Some((key, after)) = split_key(rest) else {
            continue;
        };
        while stack.last().is_some_and(|top| top.indent >= indent) {
            stack.pop();
        }
        let value_offset = line_start + (line.len() - after.len());
        // A key of a sequence item names the item (for `[key=value]` segments).
        let scalar = scalar_in(after, value_offset);
        if let Some(item) = stack.iter_mut().rev().find(|f| f.item && f.indent < indent)
            && matches!(item.segment, Segment::Key(ref k) if k == "[]")
            && let Ok(Some((s, e, style))) = &scalar
        {
            let value = unquote(&text[*s..*e], *style);
            if path
                .iter()
                .any(|p| matches!(p, Segment::Item { key: k, value: v } if *k == key && *v == value))
            {
                item.segment = Segment::Item {
                    key: key.clone(),
                    value,
                };
            }
        }
        let mut here: Vec<Segment> = stack.iter().map(|f| f.segment.clone()).collect();
        here.push(Segment::Key(key.clone()));
        seen.push(here.clone());
        match scalar {
            Ok(Some((start, end, style))) => {
                if here == path {
                    found.push(Found {
                        doc,
                        line: n + 1,
                        start,
                        end,
                        style,
                    });
                }
            }
            Ok(None) => stack.push(Frame {
                indent,
                segment: Segment::Key(key),
                item: false,
            }),
            Err(why) => {
                if here == path {
                    return Err(format!("line {}: {} {why}", n + 1, show(path)).into());
                }
                if why.starts_with("is a block scalar") {
                    block = Some(indent);
                }
            }
        }
    }
    Ok((found, seen))
}

fn unquote(text: &str, style: Style) -> String {
    match style {
        Style::Plain => text.to_string(),
        Style::Single => text[1..text.len() - 1].replace("''", "'"),
        Style::Double => text[1..text.len() - 1].replace("\\\"", "\"").replace("\\\\", "\\"),
    }
}

/// `value` written in `style`; a plain value that YAML would read as something other than this
/// string (a number, a boolean, `null`, a comment) is double-quoted instead.
fn render(value: &str, style: Style) -> String {
    let double = || format!("\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\""));
    match style {
        Style::Double => double(),
        Style::Single => format!("'{}'", value.replace('\'', "''")),
        Style::Plain => {
            let plain_ok = !value.is_empty()
                && !value.contains('\n')
                && serde_saphyr::from_str::<Value>(&format!("k: {value}\n")).ok()
                    == Some(serde_json::json!({ "k": value }));
            if plain_ok { value.to_string() } else { double() }
        }
    }
}

fn set_in(doc: &mut Value, path: &[Segment], value: &Value) -> bool {
    let Some((first, rest)) = path.split_first() else {
        *doc = value.clone();
        return true;
    };
    let next = match first {
        Segment::Key(k) => doc.get_mut(k),
        Segment::Item { key, value: v } => doc.as_array_mut().and_then(|items| {
            items
                .iter_mut()
                .find(|i| i.get(key).and_then(Value::as_str) == Some(v.as_str()))
        }),
    };
    match next {
        Some(next) => set_in(next, rest, value),
        None => false,
    }
}

/// Sets the scalar at `path` of `text` to the string `value`. Returns the new text and the
/// change, or an error that says what is wrong and where (and changes nothing).
pub fn set(text: &str, path: &str, value: &str) -> Result<(String, Change), ValuesError> {
    set_scalar(text, path, &Value::String(value.to_string()))
}

/// Sets the scalar at `path` of `text` to `value`: a string (quoted as the value was, or when
/// YAML would read it as something else), a number or a boolean (written plain). See [`set`].
pub fn set_scalar(text: &str, path: &str, value: &Value) -> Result<(String, Change), ValuesError> {
    if !matches!(value, Value::String(_) | Value::Number(_) | Value::Bool(_)) {
        return Err(ValuesError::from(format!(
            "{path}: a value set is a string, a number or a boolean, not {value}"
        )));
    }
    let segments = parse_path(path)?;
    let before: Vec<Value> =
        serde_saphyr::from_multiple(text).map_err(|e| format!("the file is not valid YAML: {e}"))?;
    let (found, seen) = locate(text, &segments)?;
    let at = match found.as_slice() {
        [one] => one.clone(),
        [] => return Err(not_found(&segments, &seen).into()),
        many => {
            return Err(ValuesError::from(format!(
                "{} is set more than once (lines {})",
                path,
                many.iter().map(|f| f.line.to_string()).collect::<Vec<_>>().join(", ")
            )));
        }
    };
    let old = text[at.start..at.end].to_string();
    let new = match value {
        Value::String(s) => render(s, at.style),
        other => other.to_string(),
    };
    let mut out = String::with_capacity(text.len() + new.len());
    out.push_str(&text[..at.start]);
    out.push_str(&new);
    out.push_str(&text[at.end..]);

    let after: Vec<Value> = serde_saphyr::from_multiple(&out).map_err(|e| format!("the edit broke the YAML: {e}"))?;
    let mut expected = before;
    if !expected.get_mut(at.doc).is_some_and(|d| set_in(d, &segments, value)) || after != expected {
        return Err(ValuesError::from(format!(
            "changing line {} would change more than {path} (is the value anchored and aliased elsewhere?); nothing changed",
            at.line
        )));
    }
    Ok((
        out,
        Change {
            line: at.line,
            old,
            new,
        },
    ))
}

/// The string value at `path` of `text`.
pub fn get(text: &str, path: &str) -> Result<String, ValuesError> {
    let segments = parse_path(path)?;
    let (found, seen) = locate(text, &segments)?;
    match found.as_slice() {
        [one] => Ok(unquote(&text[one.start..one.end], one.style)),
        [] => Err(not_found(&segments, &seen).into()),
        _ => Err(ValuesError::from(format!("{path} is set more than once"))),
    }
}

/// The error for a path that is not in the file: where the path stops, and what is there.
fn not_found(path: &[Segment], seen: &[Vec<Segment>]) -> String {
    let mut deepest = 0;
    for p in seen {
        let common = p.iter().zip(path).take_while(|(a, b)| a == b).count();
        deepest = deepest.max(common);
    }
    if deepest == path.len() {
        return format!("{} is not a single value: it holds a mapping or a list", show(path));
    }
    let prefix = &path[..deepest];
    let mut keys: Vec<String> = seen
        .iter()
        .filter(|p| p.len() == deepest + 1 && p.starts_with(prefix))
        .map(|p| p[deepest].to_string())
        .collect();
    keys.dedup();
    let under = if deepest == 0 {
        "at the top".to_string()
    } else {
        format!("under {}", show(prefix))
    };
    format!(
        "no key {} in the file: there is no {} {under} (keys there: {})",
        show(path),
        path[deepest],
        if keys.is_empty() {
            "none".into()
        } else {
            keys.join(", ")
        }
    )
}

#[cfg(test)]
mod tests {
    use super::set;

    #[test]
    fn a_plain_value_changes_alone_with_its_comment() {
        let text = "image:\n  repository: ghcr.io/acme/api # the app\n  tag: 1.2.3   # set by CI\n\nreplicas: 2\n";
        let (out, change) = set(text, "image.tag", "1.2.4").unwrap();
        assert_eq!(
            out,
            "image:\n  repository: ghcr.io/acme/api # the app\n  tag: 1.2.4   # set by CI\n\nreplicas: 2\n"
        );
        assert_eq!(change.line, 3);
    }

    #[test]
    fn quoting_is_kept_and_added_only_when_needed() {
        let text = "a:\n  tag: \"1.2\"\nb:\n  tag: 'v1'\nc:\n  tag: v1\n";
        assert!(set(text, "a.tag", "1.10").unwrap().0.contains("tag: \"1.10\""));
        assert!(set(text, "b.tag", "it's").unwrap().0.contains("tag: 'it''s'"));
        // Plain 1.10 would read as the number 1.1: it gets quotes.
        assert!(set(text, "c.tag", "1.10").unwrap().0.contains("tag: \"1.10\""));
        assert!(set(text, "c.tag", "v2").unwrap().0.contains("tag: v2\n"));
    }

    #[test]
    fn a_missing_key_says_where_the_path_stops() {
        let text = "api-gateway:\n  image:\n    repository: x\n    tag: v1\n";
        let err = set(text, "api-gateway.image.tagg", "v2").unwrap_err();
        assert!(
            err.contains("no tagg under api-gateway.image (keys there: repository, tag)"),
            "{err}"
        );
        let err = set(text, "web.image.tag", "v2").unwrap_err();
        assert!(err.contains("no web at the top (keys there: api-gateway)"), "{err}");
    }

    #[test]
    fn a_sequence_item_is_chosen_by_a_key() {
        let text = "images:\n- name: ghcr.io/acme/api\n  newTag: v1\n- name: ghcr.io/acme/web\n  newTag: v7\n";
        let (out, change) = set(text, "images.[name=ghcr.io/acme/web].newTag", "v8").unwrap();
        assert_eq!(
            out,
            "images:\n- name: ghcr.io/acme/api\n  newTag: v1\n- name: ghcr.io/acme/web\n  newTag: v8\n"
        );
        assert_eq!(change.line, 5);
    }

    #[test]
    fn an_aliased_value_is_refused() {
        let text = "base:\n  tag: &t v1\nother:\n  tag: *t\n";
        let err = set(text, "base.tag", "v2").unwrap_err();
        assert!(err.contains("would change more than base.tag"), "{err}");
        let err = set(text, "other.tag", "v2").unwrap_err();
        assert!(err.contains("is an alias"), "{err}");
    }
}
