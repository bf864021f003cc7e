//! QEMU's keyval syntax for command-line options (`--blockdev`,
//! `--nbd-server`, `--export`, as qemu-storage-daemon takes them):
//! `driver=file,node-name=f0,file.filename=/x,cache.direct=on`. Dotted
//! keys nest, `,,` is a literal comma, `on`/`off` are booleans, digits are
//! numbers except for keys that are always strings. JSON text (`{...}`) is
//! taken as is.

use serde_json::{Map, Value};

/// Keys whose values stay strings even when they look like numbers.
const STRING_KEYS: [&str; 12] =
    ["node-name", "id", "name", "filename", "path", "host", "port", "description", "driver", "type", "file", "backing"];

/// Parses one option argument into a JSON object.
pub fn parse(text: &str) -> Result<Value, String> {
    let t = text.trim();
    if t.starts_with('{') {
        return serde_json::from_str(t).map_err(|e| format!("'{text}' is not valid JSON: {e}"));
    }
    let mut root = Map::new();
    for part in split_commas(t) {
        let (key, raw) = part.split_once('=').ok_or_else(|| format!("'{part}' is not key=value"))?;
        if key.is_empty() || key.split('.').any(str::is_empty) {
            return Err(format!("'{part}': empty key"));
        }
        let leaf = key.rsplit('.').next().unwrap_or(key);
        let value = match raw {
            "on" | "true" => Value::Bool(true),
            "off" | "false" => Value::Bool(false),
            _ if !STRING_KEYS.contains(&leaf) && !raw.is_empty() && raw.bytes().all(|b| b.is_ascii_digit()) => {
                raw.parse::<u64>().map(Value::from).unwrap_or_else(|_| Value::String(raw.to_string()))
            }
            _ => Value::String(raw.to_string()),
        };
        insert(&mut root, key, value)?;
    }
    Ok(Value::Object(root))
}

/// Splits on single commas; `,,` stands for a comma inside a value.
fn split_commas(s: &str) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                parts.last_mut().expect("one part").push(',');
            } else {
                parts.push(String::new());
            }
        } else {
            parts.last_mut().expect("one part").push(c);
        }
    }
    parts.into_iter().filter(|p| !p.is_empty()).collect()
}

fn insert(root: &mut Map<String, Value>, key: &str, value: Value) -> Result<(), String> {
    let mut map = root;
    let parts: Vec<&str> = key.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        if i + 1 == parts.len() {
            if map.insert(part.to_string(), value).is_some() {
                return Err(format!("key '{key}' given twice"));
            }
            return Ok(());
        }
        let entry = map.entry(part.to_string()).or_insert_with(|| Value::Object(Map::new()));
        map = match entry {
            Value::Object(m) => m,
            _ => return Err(format!("key '{key}' is both a value and an object")),
        };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn qsd_style_options() {
        assert_eq!(
            parse("driver=raw,node-name=disk,file.driver=file,file.filename=/a,,b.img,cache.direct=on,size=1024")
                .unwrap(),
            json!({"driver": "raw", "node-name": "disk", "file": {"driver": "file", "filename": "/a,b.img"}, "cache": {"direct": true}, "size": 1024})
        );
        assert_eq!(
            parse("addr.type=inet,addr.host=127.0.0.1,addr.port=10809,max-connections=4").unwrap(),
            json!({"addr": {"type": "inet", "host": "127.0.0.1", "port": "10809"}, "max-connections": 4})
        );
        assert_eq!(parse("type=nbd,id=e,node-name=d,writable=off").unwrap()["writable"], json!(false));
        assert_eq!(parse(r#"{"driver": "null-co"}"#).unwrap(), json!({"driver": "null-co"}));
        assert!(parse("a=1,a=2").is_err());
        assert!(parse("a=1,a.b=2").is_err());
        assert!(parse("novalue").is_err());
        assert!(parse("{bad json").is_err());
    }
}
