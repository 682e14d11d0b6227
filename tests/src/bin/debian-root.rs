//! Prints the path of the cached Debian test root, building it first if needed, so scripts
//! (the benchmark harness) use exactly the root the tests use.

fn main() {
    let path = driftwatch_tests::debian::minbase();
    println!("{}", path.display());
}
