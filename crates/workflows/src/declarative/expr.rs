//! Expressions in workflow files: CEL (the language Kubernetes uses in its admission policies
//! and CRD validation), through the `cel` crate. A value of a workflow file is either a plain
//! value, or a string holding `${{ expression }}`: alone, the string is the expression's value
//! (a list stays a list); among other text, each expression is written into the text.
//!
//! An expression reads `input` (the run's input, defaults filled in) and `steps` (each earlier
//! step's output by its id; `null` for a step skipped by its `when`). Both come from the run's
//! input and its journal, so an expression gives the same value on every replay.

use std::collections::HashMap;

use cel::common::ast::{EntryExpr, Expr as Node, IdedExpr};
use serde_json::{Map, Value};

/// What an expression reads.
pub(crate) struct Scope<'a> {
    pub input: &'a Value,
    pub steps: &'a Map<String, Value>,
    /// In a `for_each` step's parameters: the branch's item.
    pub item: Option<&'a Value>,
}

/// A name an expression reads, for the checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Read {
    /// `input.<field>`.
    Input(String),
    /// `steps.<id>`.
    Step(String),
    /// Any other variable (only `input` and `steps` exist).
    Other(String),
}

/// One compiled expression.
#[derive(Debug)]
pub(crate) struct Expr {
    source: String,
    program: cel::Program,
}

impl Expr {
    /// Compiles `source`; the error is the parser's first, with its column in `source`.
    pub(crate) fn compile(source: &str) -> Result<Self, String> {
        match ENV.compile(source.trim()) {
            Ok(program) => Ok(Self {
                source: source.trim().to_string(),
                program,
            }),
            Err(e) => {
                let why = e
                    .errors
                    .first()
                    .map(|p| format!("column {}: {}", p.pos.1, p.msg))
                    .unwrap_or_else(|| e.to_string());
                Err(format!("the expression `{}` does not compile ({why})", source.trim()))
            }
        }
    }

    /// Its text.
    pub(crate) fn source(&self) -> &str {
        &self.source
    }

    /// The variables it reads (a comprehension's own variables left out).
    pub(crate) fn reads(&self) -> Vec<Read> {
        let mut out = Vec::new();
        walk(self.program.expression(), &mut Vec::new(), &mut out);
        out
    }

    /// Its value in `scope`, as JSON.
    pub(crate) fn eval(&self, scope: &Scope<'_>) -> Result<Value, String> {
        let mut context = cel::Context::with_env(ENV.clone());
        context.add_variable_from_value("input", to_cel(scope.input));
        let steps: HashMap<String, cel::Value> = scope.steps.iter().map(|(k, v)| (k.clone(), to_cel(v))).collect();
        context.add_variable_from_value("steps", steps);
        if let Some(item) = scope.item {
            context.add_variable_from_value("item", to_cel(item));
        }
        let value = self
            .program
            .execute(&context)
            .map_err(|e| format!("`{}` failed: {e}", self.source))?;
        value
            .json()
            .map_err(|e| format!("`{}` gave a value that is not JSON: {e:?}", self.source))
    }
}

/// CEL's standard library with the extensions Kubernetes also enables: strings (`join`,
/// `split`, `lowerAscii`, …), lists (`sort`, `distinct`, `slice`, …) and math (`greatest`,
/// `least`, …). Built once.
static ENV: std::sync::LazyLock<std::sync::Arc<cel::Env>> = std::sync::LazyLock::new(|| {
    let mut env = cel::Env::stdlib();
    for extension in [
        cel::extensions::strings as fn(&mut cel::Env) -> Result<(), cel::DeclarationError>,
        cel::extensions::lists,
        cel::extensions::math,
    ] {
        env.add_extension(extension)
            .expect("the CEL extensions declare distinct overloads");
    }
    std::sync::Arc::new(env)
});

/// JSON as CEL sees it: whole numbers are `int` (so `input.replicas * 2` works), others `double`.
fn to_cel(v: &Value) -> cel::Value {
    match v {
        Value::Null => cel::Value::Null,
        Value::Bool(b) => (*b).into(),
        Value::Number(n) => match n.as_i64() {
            Some(i) => i.into(),
            None => n.as_f64().unwrap_or(f64::NAN).into(),
        },
        Value::String(s) => s.clone().into(),
        Value::Array(a) => a.iter().map(to_cel).collect::<Vec<_>>().into(),
        Value::Object(o) => o
            .iter()
            .map(|(k, v)| (k.clone(), to_cel(v)))
            .collect::<HashMap<String, cel::Value>>()
            .into(),
    }
}

fn walk(e: &IdedExpr, bound: &mut Vec<String>, out: &mut Vec<Read>) {
    match &e.expr {
        Node::Select(s) => match &s.operand.expr {
            Node::Ident(root) if !bound.contains(root) => out.push(match root.as_str() {
                // `has(input.x)` asks whether it is there: no check that it is declared.
                "input" if s.test => Read::Other("input".into()),
                "steps" if s.test => Read::Other("steps".into()),
                "input" => Read::Input(s.field.clone()),
                "steps" => Read::Step(s.field.clone()),
                _ => Read::Other(root.clone()),
            }),
            _ => walk(&s.operand, bound, out),
        },
        Node::Ident(name) if !bound.contains(name) => out.push(Read::Other(name.clone())),
        Node::Call(c) => {
            if let Some(t) = &c.target {
                walk(t, bound, out);
            }
            for a in &c.args {
                walk(a, bound, out);
            }
        }
        Node::Comprehension(c) => {
            walk(&c.iter_range, bound, out);
            walk(&c.accu_init, bound, out);
            let before = bound.len();
            bound.push(c.iter_var.clone());
            bound.extend(c.iter_var2.clone());
            bound.push(c.accu_var.clone());
            walk(&c.loop_cond, bound, out);
            walk(&c.loop_step, bound, out);
            walk(&c.result, bound, out);
            bound.truncate(before);
        }
        Node::List(l) => l.elements.iter().for_each(|x| walk(x, bound, out)),
        Node::Map(m) => {
            for entry in &m.entries {
                if let EntryExpr::MapEntry(me) = &entry.expr {
                    walk(&me.key, bound, out);
                    walk(&me.value, bound, out);
                }
            }
        }
        Node::Struct(s) => {
            for entry in &s.entries {
                if let EntryExpr::StructField(f) = &entry.expr {
                    walk(&f.value, bound, out);
                }
            }
        }
        _ => {}
    }
}

/// A value of a workflow file with its expressions compiled.
#[derive(Debug)]
pub(crate) enum Template {
    /// No expression in it.
    Plain(Value),
    /// A string that is one `${{ … }}`: the expression's value.
    Whole(Expr),
    /// Text with expressions in it: each one's value written in.
    Text(Vec<Piece>),
    List(Vec<Template>),
    Object(Vec<(String, Template)>),
}

#[derive(Debug)]
pub(crate) enum Piece {
    Text(String),
    Expr(Expr),
}

impl Template {
    /// Compiles the expressions in `v`; an error says which key (below `v`) holds the bad one.
    pub(crate) fn compile(v: &Value) -> Result<Self, (String, String)> {
        match v {
            Value::String(s) => Self::compile_text(s).map_err(|e| (String::new(), e)),
            Value::Array(items) => {
                let mut out = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    out.push(Self::compile(item).map_err(|(at, e)| (format!("[{i}]{at}"), e))?);
                }
                Ok(if out.iter().all(|t| matches!(t, Template::Plain(_))) {
                    Template::Plain(v.clone())
                } else {
                    Template::List(out)
                })
            }
            Value::Object(fields) => {
                let mut out = Vec::with_capacity(fields.len());
                for (k, item) in fields {
                    out.push((
                        k.clone(),
                        Self::compile(item).map_err(|(at, e)| (format!(".{k}{at}"), e))?,
                    ));
                }
                Ok(if out.iter().all(|(_, t)| matches!(t, Template::Plain(_))) {
                    Template::Plain(v.clone())
                } else {
                    Template::Object(out)
                })
            }
            other => Ok(Template::Plain(other.clone())),
        }
    }

    fn compile_text(s: &str) -> Result<Self, String> {
        let mut pieces = Vec::new();
        let mut rest = s;
        while let Some(start) = rest.find("${{") {
            let Some(len) = rest[start + 3..].find("}}") else {
                return Err(format!("`${{{{` without its `}}}}` in {s:?}"));
            };
            if start > 0 {
                pieces.push(Piece::Text(rest[..start].to_string()));
            }
            pieces.push(Piece::Expr(Expr::compile(&rest[start + 3..start + 3 + len])?));
            rest = &rest[start + 3 + len + 2..];
        }
        if !rest.is_empty() {
            pieces.push(Piece::Text(rest.to_string()));
        }
        Ok(match pieces.len() {
            0 => Template::Plain(Value::String(String::new())),
            1 => match pieces.pop() {
                Some(Piece::Expr(e)) => Template::Whole(e),
                _ => Template::Plain(Value::String(s.to_string())),
            },
            _ => Template::Text(pieces),
        })
    }

    /// Its expressions, for the checks.
    pub(crate) fn exprs(&self) -> Vec<&Expr> {
        match self {
            Template::Plain(_) => Vec::new(),
            Template::Whole(e) => vec![e],
            Template::Text(pieces) => pieces
                .iter()
                .filter_map(|p| match p {
                    Piece::Expr(e) => Some(e),
                    Piece::Text(_) => None,
                })
                .collect(),
            Template::List(items) => items.iter().flat_map(Template::exprs).collect(),
            Template::Object(fields) => fields.iter().flat_map(|(_, t)| t.exprs()).collect(),
        }
    }

    /// Its value in `scope`.
    pub(crate) fn eval(&self, scope: &Scope<'_>) -> Result<Value, String> {
        Ok(match self {
            Template::Plain(v) => v.clone(),
            Template::Whole(e) => e.eval(scope)?,
            Template::Text(pieces) => {
                let mut text = String::new();
                for p in pieces {
                    match p {
                        Piece::Text(t) => text.push_str(t),
                        Piece::Expr(e) => match e.eval(scope)? {
                            Value::String(s) => text.push_str(&s),
                            Value::Null => {}
                            other => text.push_str(&other.to_string()),
                        },
                    }
                }
                Value::String(text)
            }
            Template::List(items) => Value::Array(items.iter().map(|t| t.eval(scope)).collect::<Result<_, _>>()?),
            Template::Object(fields) => Value::Object(
                fields
                    .iter()
                    .map(|(k, t)| Ok((k.clone(), t.eval(scope)?)))
                    .collect::<Result<_, String>>()?,
            ),
        })
    }
}

/// The parts of `t` that give the value at `path` (dotted, `field[]` for each element of a list),
/// each with its key below `t` (`.secrets[0].namespace`): the templates there, or the first one
/// above it that is an expression (which computes everything below). A plain value gives none:
/// what is written in the file is not a caller's.
pub(crate) fn at_path<'t>(t: &'t Template, path: &[&str], below: &str) -> Vec<(String, &'t Template)> {
    let Some((first, rest)) = path.split_first() else {
        return match t {
            Template::Plain(_) => Vec::new(),
            other => vec![(below.to_string(), other)],
        };
    };
    let (field, each) = match first.strip_suffix("[]") {
        Some(f) => (f, true),
        None => (*first, false),
    };
    match t {
        Template::Plain(_) => Vec::new(),
        Template::Object(fields) => match fields.iter().find(|(k, _)| k == field) {
            None => Vec::new(),
            Some((_, v)) => {
                let below = format!("{below}.{field}");
                if !each {
                    return at_path(v, rest, &below);
                }
                match v {
                    Template::List(items) => items
                        .iter()
                        .enumerate()
                        .flat_map(|(i, item)| at_path(item, rest, &format!("{below}[{i}]")))
                        .collect(),
                    Template::Plain(_) => Vec::new(),
                    other => vec![(below, other)],
                }
            }
        },
        other => vec![(below.to_string(), other)],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn eval(t: &Template, input: Value, steps: Value) -> Result<Value, String> {
        let steps = steps.as_object().cloned().unwrap_or_default();
        t.eval(&Scope {
            input: &input,
            steps: &steps,
            item: None,
        })
    }

    #[test]
    fn a_whole_expression_keeps_its_type_and_text_gets_each_value_written_in() {
        let t = Template::compile(&json!({
            "replicas": "${{ input.replicas * 2 }}",
            "names": "${{ steps.list.items.map(i, i.name) }}",
            "text": "scaled ${{ input.app }} to ${{ input.replicas * 2 }}",
            "plain": "no expression",
        }))
        .unwrap();
        let v = eval(
            &t,
            json!({"replicas": 3, "app": "shop"}),
            json!({"list": {"items": [{"name": "a"}, {"name": "b"}]}}),
        )
        .unwrap();
        assert_eq!(
            v,
            json!({"replicas": 6, "names": ["a", "b"], "text": "scaled shop to 6", "plain": "no expression"})
        );
    }

    #[test]
    fn the_string_list_and_math_extensions_kubernetes_has_are_there() {
        let t = Template::compile(&json!({
            "joined": "${{ steps.pods.names.sort().join(', ') }}",
            "distinct": "${{ size(steps.pods.names.distinct()) }}",
            "upper": "${{ 'web'.upperAscii() }}",
            "most": "${{ math.greatest(steps.pods.ages) }}",
            "timed": "${{ timestamp('2026-12-14T00:00:00Z') - timestamp('2026-12-04T00:00:00Z') < duration('336h') }}",
        }))
        .unwrap();
        let v = eval(
            &t,
            json!({}),
            json!({"pods": {"names": ["web", "db", "web"], "ages": [3, 9, 1]}}),
        )
        .unwrap();
        assert_eq!(
            v,
            json!({"joined": "db, web, web", "distinct": 2, "upper": "WEB", "most": 9, "timed": true})
        );
    }

    #[test]
    fn the_reads_of_an_expression_are_listed_without_a_comprehension_s_own_variables() {
        let e = Expr::compile("steps.pods.items.filter(p, p.ready).size() > input.min && has(input.extra)").unwrap();
        assert_eq!(
            e.reads(),
            vec![
                Read::Step("pods".into()),
                Read::Input("min".into()),
                Read::Other("input".into())
            ]
        );
        assert_eq!(
            Expr::compile("nope.x").unwrap().reads(),
            vec![Read::Other("nope".into())]
        );
    }

    #[test]
    fn a_bad_expression_is_refused_with_its_column_and_an_unclosed_one_is_named() {
        let err = Expr::compile("input.n +").unwrap_err();
        assert!(err.contains("`input.n +` does not compile (column 10"), "{err}");
        let (_, err) = Template::compile(&json!("a ${{ input.n ")).unwrap_err();
        assert!(err.contains("without its"), "{err}");
        let (at, _) = Template::compile(&json!({"a": ["x", "${{ ) }}"]})).unwrap_err();
        assert_eq!(at, ".a[1]");
    }

    #[test]
    fn reading_what_is_not_there_fails_with_the_expression_named() {
        let t = Template::compile(&json!("${{ input.missing }}")).unwrap();
        let err = eval(&t, json!({}), json!({})).unwrap_err();
        assert!(err.contains("`input.missing` failed"), "{err}");
    }
}
