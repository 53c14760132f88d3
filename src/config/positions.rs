//! Where each node of a YAML document starts, by path, so that every schedule error can name its line and
//! column. serde_yaml's values carry no positions; yaml-rust2's event parser reports a marker per event.
use std::collections::hash_map::Entry;
use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// A path into a YAML document: mapping keys and sequence indices (`"[3]"`).
pub type YamlPath = Vec<String>;

/// A 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// Line, from 1.
    pub line: usize,
    /// Column, from 1.
    pub column: usize,
}

/// The positions of keys and values in one YAML document.
#[derive(Debug, Default)]
pub struct Positions {
    keys: HashMap<YamlPath, Location>,
    values: HashMap<YamlPath, Location>,
    duplicates: Vec<(YamlPath, Location)>,
}

enum Frame {
    Map { path: YamlPath, key: Option<String> },
    Seq { path: YamlPath, index: usize },
}

#[derive(Default)]
struct Collector {
    stack: Vec<Frame>,
    positions: Positions,
}

fn location(m: &Marker) -> Location {
    Location { line: m.line(), column: m.col() + 1 }
}

impl Collector {
    /// The path of the value about to start, recording a key instead when a mapping expects one.
    /// Returns `None` for a key.
    fn next_value_path(&mut self, scalar: Option<&str>, mark: &Marker) -> Option<YamlPath> {
        match self.stack.last_mut() {
            None => Some(Vec::new()),
            Some(Frame::Map { path, key }) => match key.take() {
                Some(k) => {
                    let mut p = path.clone();
                    p.push(k);
                    Some(p)
                }
                None => {
                    let k = scalar.unwrap_or("").to_string();
                    let mut p = path.clone();
                    p.push(k.clone());
                    match self.positions.keys.entry(p) {
                        Entry::Vacant(e) => {
                            e.insert(location(mark));
                        }
                        Entry::Occupied(e) => self.positions.duplicates.push((e.key().clone(), location(mark))),
                    }
                    *key = Some(k);
                    None
                }
            },
            Some(Frame::Seq { path, index }) => {
                let mut p = path.clone();
                p.push(format!("[{index}]"));
                *index += 1;
                Some(p)
            }
        }
    }
}

impl MarkedEventReceiver for Collector {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::Scalar(ref v, ..) => {
                if let Some(p) = self.next_value_path(Some(v), &mark) {
                    self.positions.values.insert(p, location(&mark));
                }
            }
            Event::Alias(_) => {
                if let Some(p) = self.next_value_path(None, &mark) {
                    self.positions.values.insert(p, location(&mark));
                }
            }
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                let path = self.next_value_path(None, &mark).unwrap_or_default();
                self.positions.values.insert(path.clone(), location(&mark));
                self.stack.push(if matches!(ev, Event::MappingStart(..)) { Frame::Map { path, key: None } } else { Frame::Seq { path, index: 0 } });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}

impl Positions {
    /// Positions of `text`'s first document; empty if it does not parse (serde_yaml reports that error).
    pub fn of(text: &str) -> Positions {
        let mut c = Collector::default();
        let _ = Parser::new_from_str(text).load(&mut c, false);
        c.positions
    }

    /// Keys written twice in the same mapping, at their second occurrence.
    pub fn duplicates(&self) -> &[(YamlPath, Location)] {
        &self.duplicates
    }

    /// Where the key at `path` is written, else its value, else the nearest ancestor's position.
    pub fn key(&self, path: &[String]) -> Option<Location> {
        self.find(path, true)
    }

    /// Where the value at `path` starts, else its key, else the nearest ancestor's position.
    pub fn value(&self, path: &[String]) -> Option<Location> {
        self.find(path, false)
    }

    fn find(&self, path: &[String], key_first: bool) -> Option<Location> {
        (0..=path.len()).rev().find_map(|n| {
            let p = &path[..n];
            let (first, second) = if key_first { (&self.keys, &self.values) } else { (&self.values, &self.keys) };
            first.get(p).or_else(|| second.get(p)).copied()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(p: &[&str]) -> YamlPath {
        p.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn finds_keys_values_and_sequence_items() {
        let text = "version: 1\npruners:\n  p1:\n    class: AutomatedGradualPruner\n    weights: [a.weight,\n              b.weight]\n";
        let pos = Positions::of(text);
        assert_eq!(pos.key(&path(&["pruners", "p1", "class"])), Some(Location { line: 4, column: 5 }));
        assert_eq!(pos.value(&path(&["pruners", "p1", "class"])), Some(Location { line: 4, column: 12 }));
        assert_eq!(pos.value(&path(&["pruners", "p1", "weights", "[1]"])), Some(Location { line: 6, column: 15 }));
        // Unknown paths fall back to the nearest known ancestor.
        assert_eq!(pos.key(&path(&["pruners", "p1", "nope"])), pos.key(&path(&["pruners", "p1"])));
    }
}

#[cfg(test)]
mod duplicate_tests {
    use super::*;

    #[test]
    fn reports_keys_written_twice() {
        let text = "a:\n  b: [1, x]\n  c: [2, y]\n  b: [3, z]\n";
        let pos = Positions::of(text);
        assert_eq!(pos.duplicates(), &[(vec!["a".to_string(), "b".to_string()], Location { line: 4, column: 3 })]);
    }
}
