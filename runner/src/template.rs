//! Chat templates: the model's Jinja template rendered with minijinja the way transformers'
//! `apply_chat_template` renders it (trim_blocks and lstrip_blocks on, loop controls,
//! `raise_exception`, `tojson`; HF's `{% generation %}` training markers are no-ops).
//! Message content is passed as a list of parts, `[{"type": "text", "text": ...}]`, which
//! MiniMax-Text-01's template requires.

use anyhow::{anyhow, Result};
use minijinja::{context, Environment, Error, ErrorKind};
use serde_json::json;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub text: String,
}

impl Message {
    pub fn new(role: &str, text: &str) -> Message {
        Message { role: role.into(), text: text.into() }
    }
}

/// Removes `{% generation %}` / `{% endgeneration %}` tags (any whitespace control).
fn strip_generation_tags(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(start) = rest.find("{%") {
        // the closing "%}" is searched after the opening "{%" (in "{%}" they overlap)
        let Some(len) = rest[start + 2..].find("%}") else { break };
        let end = start + 2 + len + 2;
        let tag = &rest[start + 2..start + 2 + len];
        let word = tag.trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        out.push_str(&rest[..start]);
        if word != "generation" && word != "endgeneration" {
            out.push_str(&rest[start..end]);
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// Renders `template` for `messages`, ending with the assistant header when
/// `add_generation_prompt`.
pub fn render(template: &str, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.add_function("raise_exception", |msg: String| -> Result<String, Error> { Err(Error::new(ErrorKind::InvalidOperation, msg)) });
    let src = strip_generation_tags(template);
    env.add_template("chat", &src).map_err(|e| anyhow!("chat template does not parse: {e}"))?;
    let msgs: Vec<serde_json::Value> =
        messages.iter().map(|m| json!({"role": m.role, "content": [{"type": "text", "text": m.text}]})).collect();
    let tmpl = env.get_template("chat").map_err(|e| anyhow!("chat template: {e}"))?;
    tmpl.render(context! { messages => msgs, add_generation_prompt => add_generation_prompt, tools => None::<Vec<()>> })
        .map_err(|e| anyhow!("rendering the chat template: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_tags_go_and_other_tags_stay() {
        assert_eq!(strip_generation_tags("a{% generation %}b{%- endgeneration -%}c{% if x %}d{% endif %}"), "abc{% if x %}d{% endif %}");
        // "{%}": the opening and a closing would overlap (found by fuzzing; it panicked)
        assert_eq!(strip_generation_tags("x{%}y"), "x{%}y");
        assert_eq!(strip_generation_tags("{%}%}z"), "{%}%}z");
        assert_eq!(strip_generation_tags("{% generation"), "{% generation");
        let e = render("{%}", &[Message::new("user", "hi")], true).unwrap_err().to_string();
        assert!(e.contains("does not parse"), "{e}");
    }
}
