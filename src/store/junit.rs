//! JUnit XML test results, read into totals and the failed tests: the
//! format every test runner writes (JUnit, pytest, go-junit-report, jest,
//! cargo-nextest, Maven Surefire), `<testsuites>` or a lone `<testsuite>`,
//! suites nested or not. Counts come from the `<testcase>` elements; only
//! a file with none falls back to the suites' own `tests`/`failures`/
//! `errors`/`skipped` attributes. A file is the step's output and so
//! hostile: DTDs (and with them entity expansion) are refused, and files
//! over [`MAX_FILE_BYTES`] are not read.

use crate::model::{TestFailure, TestResults};

/// The largest result file read (what a huge suite writes is far less).
pub const MAX_FILE_BYTES: usize = 64 << 20;
/// A failure's message is cut to this many characters.
const MAX_MESSAGE_CHARS: usize = 1000;

/// Reads one result file, `file` naming it in what comes back. Never
/// fails: a file that cannot be read is counted in `unreadable` with why.
pub fn parse(file: &str, xml: &[u8]) -> TestResults {
    match read(file, xml) {
        Ok(results) => results,
        Err(why) => TestResults {
            unreadable: vec![format!("{file}: {why}")],
            ..Default::default()
        },
    }
}

fn read(file: &str, xml: &[u8]) -> Result<TestResults, String> {
    if xml.len() > MAX_FILE_BYTES {
        return Err(format!(
            "is {} bytes; result files over {} MiB are not read",
            xml.len(),
            MAX_FILE_BYTES >> 20
        ));
    }
    let text = std::str::from_utf8(xml).map_err(|e| format!("is not UTF-8: {e}"))?;
    // A BOM is allowed before the declaration.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let doc = roxmltree::Document::parse(text).map_err(|e| format!("is not XML: {e}"))?;
    let root = doc.root_element();
    if !matches!(root.tag_name().name(), "testsuites" | "testsuite") {
        return Err(format!(
            "is not JUnit XML: its root element is <{}>, not <testsuites> or <testsuite>",
            root.tag_name().name()
        ));
    }
    let mut out = TestResults {
        files: 1,
        ..Default::default()
    };
    let cases: Vec<_> = root
        .descendants()
        .filter(|n| n.has_tag_name("testcase"))
        .collect();
    if cases.is_empty() {
        // A summary only: the outermost suites' attributes.
        let suites: Vec<_> = if root.has_tag_name("testsuite") {
            vec![root]
        } else {
            root.children().filter(|n| n.has_tag_name("testsuite")).collect()
        };
        let count = |n: &roxmltree::Node, name: &str| -> u32 {
            n.attribute(name).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
        };
        for s in suites {
            out.tests = out.tests.saturating_add(count(&s, "tests"));
            out.failures = out.failures.saturating_add(count(&s, "failures"));
            out.errors = out.errors.saturating_add(count(&s, "errors"));
            out.skipped = out
                .skipped
                .saturating_add(count(&s, "skipped").max(count(&s, "disabled")));
        }
        return Ok(out);
    }
    for case in cases {
        out.tests = out.tests.saturating_add(1);
        // (Surefire's flakyFailure and rerunFailure: passed on a rerun.)
        let outcome = case
            .children()
            .find(|n| n.is_element() && matches!(n.tag_name().name(), "failure" | "error" | "skipped"));
        let Some(outcome) = outcome else { continue };
        match outcome.tag_name().name() {
            "skipped" => {
                out.skipped = out.skipped.saturating_add(1);
                continue;
            }
            "failure" => out.failures = out.failures.saturating_add(1),
            _ => out.errors = out.errors.saturating_add(1),
        }
        if out.failed.len() >= crate::model::state::MAX_FAILED_TESTS {
            continue;
        }
        let suite = case
            .ancestors()
            .find(|n| n.has_tag_name("testsuite"))
            .and_then(|s| s.attribute("name"))
            .unwrap_or_default();
        let message = outcome
            .attribute("message")
            .filter(|m| !m.trim().is_empty())
            .map(str::to_string)
            .or_else(|| {
                let text: String = outcome.descendants().filter_map(|n| n.text()).collect();
                text.lines()
                    .map(str::trim)
                    .find(|l| !l.is_empty())
                    .map(str::to_string)
            })
            .unwrap_or_else(|| outcome.attribute("type").unwrap_or_default().to_string());
        out.failed.push(TestFailure {
            suite: suite.to_string(),
            classname: case.attribute("classname").unwrap_or_default().to_string(),
            name: case.attribute("name").unwrap_or_default().to_string(),
            message: cut(&message),
            file: file.to_string(),
        });
    }
    Ok(out)
}

fn cut(s: &str) -> String {
    match s.char_indices().nth(MAX_MESSAGE_CHARS) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_suites_are_counted_by_their_test_cases() {
        let xml = br#"<?xml version="1.0" encoding="UTF-8"?>
<testsuites tests="99" failures="99">
  <testsuite name="unit" tests="4">
    <testcase classname="a.B" name="adds" time="0.01"/>
    <testcase classname="a.B" name="subtracts"><failure message="expected 1, got 2" type="AssertionError">trace</failure></testcase>
    <testcase classname="a.B" name="divides"><error type="ZeroDivisionError">
        ZeroDivisionError: division by zero
        at line 3</error></testcase>
    <testcase classname="a.B" name="later"><skipped/></testcase>
    <testsuite name="inner">
      <testcase classname="c" name="flaky"><flakyFailure message="once"/></testcase>
    </testsuite>
  </testsuite>
</testsuites>"#;
        let r = parse("reports/unit.xml", xml);
        assert_eq!(
            (r.tests, r.failures, r.errors, r.skipped, r.files),
            (5, 1, 1, 1, 1)
        );
        assert_eq!(r.failed.len(), 2);
        assert_eq!(r.failed[0].message, "expected 1, got 2");
        assert_eq!(r.failed[0].suite, "unit");
        assert_eq!(r.failed[0].classname, "a.B");
        assert_eq!(r.failed[0].name, "subtracts");
        assert_eq!(r.failed[0].file, "reports/unit.xml");
        // No message attribute: the text's first line.
        assert_eq!(r.failed[1].message, "ZeroDivisionError: division by zero");
    }

    #[test]
    fn a_lone_testsuite_and_a_summary_only_file() {
        let r = parse(
            "a.xml",
            br#"<testsuite name="pytest"><testcase name="t"/></testsuite>"#,
        );
        assert_eq!((r.tests, r.failures), (1, 0));
        let r = parse(
            "b.xml",
            br#"<testsuites><testsuite name="s" tests="7" failures="2" errors="1" skipped="3"/></testsuites>"#,
        );
        assert_eq!((r.tests, r.failures, r.errors, r.skipped), (7, 2, 1, 3));
        assert!(r.failed.is_empty());
    }

    #[test]
    fn what_cannot_be_read_says_why_and_counts_nothing() {
        let bomb = br#"<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;">]>
<testsuite><testcase name="&lol2;"/></testsuite>"#;
        let r = parse("bomb.xml", bomb);
        assert_eq!((r.tests, r.files), (0, 0));
        assert!(
            r.unreadable[0].starts_with("bomb.xml: is not XML"),
            "{:?}",
            r.unreadable
        );
        let r = parse("x.xml", b"<html><body/></html>");
        assert!(
            r.unreadable[0].contains("root element is <html>"),
            "{:?}",
            r.unreadable
        );
        let r = parse("y.xml", b"\xff\xfe");
        assert!(r.unreadable[0].contains("not UTF-8"), "{:?}", r.unreadable);
        let r = parse("z.xml", b"<testsuite><testcase>");
        assert!(
            r.unreadable[0].starts_with("z.xml: is not XML"),
            "{:?}",
            r.unreadable
        );
    }

    #[test]
    fn merged_results_name_at_most_a_hundred_failures_but_count_all() {
        let mut xml = String::from("<testsuite name=\"s\">");
        for i in 0..150 {
            xml.push_str(&format!(
                "<testcase name=\"t{i}\"><failure message=\"m{i}\"/></testcase>"
            ));
        }
        xml.push_str("</testsuite>");
        let mut all = TestResults::default();
        all.merge(parse("one.xml", xml.as_bytes()));
        all.merge(parse("two.xml", xml.as_bytes()));
        assert_eq!((all.tests, all.failures, all.files), (300, 300, 2));
        assert_eq!(all.failed.len(), 100);
        let long = format!(
            "<testsuite><testcase name=\"t\"><failure message=\"{}\"/></testcase></testsuite>",
            "x".repeat(5000)
        );
        let r = parse("long.xml", long.as_bytes());
        assert_eq!(r.failed[0].message.chars().count(), MAX_MESSAGE_CHARS + 1);
    }
}
