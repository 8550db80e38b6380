//! Writes the seeds of the `record` and `journal` fuzz targets (fuzz/seeds/), made by the
//! journal's own encoder: `cargo run --example fuzz_seeds --features fuzzing`.

use std::fs;
use std::path::Path;

fn main() -> std::io::Result<()> {
    let records = straycat::fuzzing::sample_records();
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
    fs::create_dir_all(seeds.join("record"))?;
    fs::create_dir_all(seeds.join("journal"))?;
    for (i, r) in records.iter().enumerate() {
        fs::write(seeds.join(format!("record/{i:02}.bin")), r)?;
    }
    let journal = records.concat();
    fs::write(seeds.join("journal/clean.bin"), &journal)?;
    // A write torn by a crash: the last record cut in half.
    let torn = &journal[..journal.len() - records.last().map_or(0, |r| r.len() / 2 + 1)];
    fs::write(seeds.join("journal/torn.bin"), torn)?;
    Ok(())
}
