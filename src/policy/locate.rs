//! Where in the YAML text a policy path (`grants[2].fields[1]`) is, so every error can say
//! `file:line:column`. Built from the parser's event stream (spans), independent of serde.

use std::{collections::HashMap, path::Path};

use saphyr_parser::{Event, Parser};

use super::{PolicyError, PolicyErrors};

enum Frame {
    Map {
        path: String,
        key: Option<String>,
        want_key: bool,
    },
    Seq {
        path: String,
        idx: usize,
    },
}

fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

fn child_path(stack: &[Frame]) -> String {
    match stack.last() {
        Some(Frame::Map {
            path, key: Some(k), ..
        }) => join(path, k),
        Some(Frame::Map { path, .. }) => path.clone(),
        Some(Frame::Seq { path, idx }) => format!("{path}[{idx}]"),
        None => String::new(),
    }
}

fn after_value(stack: &mut [Frame]) {
    match stack.last_mut() {
        Some(Frame::Map { want_key, key, .. }) => {
            *want_key = true;
            *key = None;
        }
        Some(Frame::Seq { idx, .. }) => *idx += 1,
        None => {}
    }
}

/// Refuse a document too large or too deeply nested to parse, from the parser's event stream
/// (linear in the input; stops at the first level too deep).
pub fn check_shape(bytes: &[u8], max_bytes: usize, max_depth: usize) -> Result<(), PolicyError> {
    if bytes.len() > max_bytes {
        return Err(PolicyError::new(
            "yaml",
            format!(
                "the policy is {} bytes; at most {max_bytes} are accepted",
                bytes.len()
            ),
        ));
    }
    // Not text: the full parse reports it.
    let Ok(text) = std::str::from_utf8(bytes) else {
        return Ok(());
    };
    let mut depth = 0usize;
    let mut parser = Parser::new_from_str(text);
    let too_deep = |line: usize, col: usize| {
        let mut e = PolicyError::new(
            "yaml",
            format!("nested more than {max_depth} levels deep; the data-sharing model needs 6"),
        );
        e.line = Some(line);
        e.column = Some(col);
        e
    };
    while let Some(next) = parser.next_event() {
        let (ev, span) = match next {
            Ok(x) => x,
            // The scanner's own bound on flow nesting (255 levels).
            Err(e) if e.info().contains("recursion limit") => {
                return Err(too_deep(e.marker().line(), e.marker().col() + 1));
            }
            // Anything else the full parse reports, with its own words.
            Err(_) => return Ok(()),
        };
        match ev {
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                depth += 1;
                if depth > max_depth {
                    return Err(too_deep(span.start.line(), span.start.col() + 1));
                }
            }
            Event::MappingEnd | Event::SequenceEnd => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// Every path in the document -> (line, column), both 1-based. Keys point at the key.
pub fn locations(text: &str) -> HashMap<String, (usize, usize)> {
    let mut out = HashMap::new();
    let mut stack: Vec<Frame> = Vec::new();
    let mut parser = Parser::new_from_str(text);
    while let Some(Ok((ev, span))) = parser.next_event() {
        let pos = (span.start.line(), span.start.col() + 1);
        match ev {
            Event::Scalar(v, ..) => {
                if let Some(Frame::Map {
                    path,
                    key,
                    want_key,
                }) = stack.last_mut()
                    && *want_key
                {
                    out.entry(join(path, &v)).or_insert(pos);
                    *key = Some(v.into_owned());
                    *want_key = false;
                    continue;
                }
                out.entry(child_path(&stack)).or_insert(pos);
                after_value(&mut stack);
            }
            Event::MappingStart(..) => {
                let path = child_path(&stack);
                out.entry(path.clone()).or_insert(pos);
                stack.push(Frame::Map {
                    path,
                    key: None,
                    want_key: true,
                });
            }
            Event::SequenceStart(..) => {
                let path = child_path(&stack);
                out.entry(path.clone()).or_insert(pos);
                stack.push(Frame::Seq { path, idx: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                stack.pop();
                after_value(&mut stack);
            }
            Event::Alias(_) => after_value(&mut stack),
            _ => {}
        }
    }
    out
}

/// Fill in each error's line and column from the text (the nearest enclosing path found).
pub fn attach(text: &str, errors: &mut [PolicyError]) {
    let locs = locations(text);
    for e in errors.iter_mut().filter(|e| e.line.is_none()) {
        let mut p = e.path.as_str();
        loop {
            if let Some(&(l, c)) = locs.get(p) {
                e.line = Some(l);
                e.column = Some(c);
                break;
            }
            match p.rfind(['.', '[']) {
                Some(i) => p = &p[..i],
                None => break,
            }
        }
    }
}

/// `file:line:column: path: message (hint: ...)`, one line per error.
pub fn render(file: &Path, errors: &PolicyErrors) -> Vec<String> {
    errors
        .0
        .iter()
        .map(|e| {
            let at = match (e.line, e.column) {
                (Some(l), Some(c)) => format!("{}:{l}:{c}", file.display()),
                _ => file.display().to_string(),
            };
            let hint = e
                .hint
                .as_deref()
                .map(|h| format!(" (hint: {h})"))
                .unwrap_or_default();
            format!("{at}: {}: {}{hint}", e.path, e.message)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_to_positions() {
        let text = "a: 1\nlist:\n  - { id: x, f: [p, q] }\n  - id: y\n    f:\n      - r\n";
        let l = locations(text);
        assert_eq!(l["a"], (1, 1));
        assert_eq!(l["list"], (2, 1));
        assert_eq!(l["list[0]"], (3, 5));
        assert_eq!(l["list[0].f[1]"], (3, 21));
        assert_eq!(l["list[1].id"], (4, 5));
        assert_eq!(l["list[1].f[0]"], (6, 9));
    }
}
