//! JUnit XML test results: read into totals and the failed tests.
