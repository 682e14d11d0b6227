//! Aligned text tables. Cells must already be escaped for display (`crate::escape`): this
//! module only measures and pads.

/// Rows under a header, each optionally followed by indented detail lines.
#[derive(Debug, Default)]
pub struct Table {
    header: Vec<&'static str>,
    rows: Vec<(Vec<String>, Vec<String>)>,
}

impl Table {
    pub fn new(header: Vec<&'static str>) -> Self {
        Table {
            header,
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push((cells, Vec::new()));
    }

    /// A row followed by detail lines (shown indented under it, outside the columns).
    pub fn row_with_details(&mut self, cells: Vec<String>, details: Vec<String>) {
        self.rows.push((cells, details));
    }

    /// Columns separated by two spaces, the last one not padded (no trailing blanks).
    pub fn render(&self) -> String {
        let n = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for (cells, _) in &self.rows {
            for (w, c) in widths.iter_mut().zip(cells) {
                *w = (*w).max(c.chars().count());
            }
        }
        let line = |cells: &mut dyn Iterator<Item = &str>| {
            let mut l = String::new();
            for (i, c) in cells.enumerate().take(n) {
                if i > 0 {
                    l.push_str("  ");
                }
                l.push_str(c);
                if i + 1 < n {
                    let pad = widths[i].saturating_sub(c.chars().count());
                    l.extend(std::iter::repeat_n(' ', pad));
                }
            }
            let mut l = l.trim_end().to_string();
            l.push('\n');
            l
        };
        let mut out = line(&mut self.header.iter().copied());
        for (cells, details) in &self.rows {
            out.push_str(&line(&mut cells.iter().map(String::as_str)));
            for d in details {
                out.push_str("    ");
                out.push_str(d);
                out.push('\n');
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligns_columns() {
        let mut t = Table::new(vec!["HOST", "STATE", "OPEN"]);
        t.row(vec!["web-1".into(), "drifted".into(), "3".into()]);
        t.row_with_details(
            vec!["db-10".into(), "clean".into(), "".into()],
            vec!["mode: 0644 -> 0666".into()],
        );
        assert_eq!(
            t.render(),
            "HOST   STATE    OPEN\n\
             web-1  drifted  3\n\
             db-10  clean\n    mode: 0644 -> 0666\n"
        );
    }
}
