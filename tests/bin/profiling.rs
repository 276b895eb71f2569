//! A sampling profile of the whole process, for `bench profile` (built with
//! `--features profile`): folded stacks (`frame;frame;frame count`) written to a file,
//! one line per distinct stack, ready for `flamegraph.pl` or a quick `sort -k2`.
//! Without the feature, asking for a profile is an error that names the feature.

/// A running profile; [`Profile::finish`] writes it.
pub struct Profile {
    #[cfg(feature = "profile")]
    guard: pprof::ProfilerGuard<'static>,
    path: std::path::PathBuf,
}

impl Profile {
    /// Starts sampling every thread of this process, 2,000 times a second.
    pub fn start(path: std::path::PathBuf) -> Result<Profile, String> {
        #[cfg(feature = "profile")]
        {
            let guard = pprof::ProfilerGuardBuilder::default()
                .frequency(2000)
                .blocklist(&["libgcc", "vdso"])
                .build()
                .map_err(|e| format!("cannot start the profiler: {e}"))?;
            Ok(Profile { guard, path })
        }
        #[cfg(not(feature = "profile"))]
        {
            Err(format!(
                "profiling to {} needs the bench built with `--features profile` (package shared-tensor-tests)",
                path.display()
            ))
        }
    }

    /// Stops and writes the folded stacks; returns the number of samples.
    pub fn finish(self) -> Result<u64, String> {
        #[cfg(feature = "profile")]
        {
            use std::fmt::Write as _;
            let report = self.guard.report().build().map_err(|e| format!("cannot build the profile: {e}"))?;
            let mut out = String::new();
            let mut samples = 0u64;
            for (frames, count) in &report.data {
                let mut stack: Vec<String> = vec![frames.thread_name_or_id()];
                for frame in frames.frames.iter().rev() {
                    for symbol in frame.iter().rev() {
                        stack.push(symbol.name().replace(';', ":"));
                    }
                }
                let _ = writeln!(out, "{} {count}", stack.join(";"));
                samples += *count as u64;
            }
            std::fs::write(&self.path, out).map_err(|e| format!("cannot write {}: {e}", self.path.display()))?;
            Ok(samples)
        }
        #[cfg(not(feature = "profile"))]
        {
            Err(format!("no profile was running for {}", self.path.display()))
        }
    }
}
