//! The bf16 product's micro-kernel on Intel AMX tiles (`tdpbf16ps`), for CPUs that have them
//! (Sapphire Rapids and later Xeons). [`super::gemm`] drives it: same rounded rows of `a`, same
//! packed panels of `b`, same output; only the inner loop differs from the AVX-512-BF16 kernel.
//!
//! A tile register holds up to 16 rows of 64 bytes. `tdpbf16ps c, a, b` adds to the 16 x 16
//! fp32 tile `c` the product of `a` (16 rows of 16 bf16 pairs: 32 values of the reduced
//! dimension) and `b` (16 rows, one per pair, of 16 columns, each column a bf16 pair). That is
//! exactly the layout of [`super::gemm`]: a rounded row of `a` is its pairs in order, and a
//! packed panel holds, for each pair, one word per column. A panel is 32 columns wide, so the two
//! `b` tiles of a step are the panel's two halves, loaded with a stride of one panel row (128
//! bytes). One call computes a 32 x 32 block: four accumulator tiles (`tmm0..tmm3`), two tiles of
//! `a` (`tmm4`, `tmm5`: rows 0-15 and 16-31) and two of `b` (`tmm6`, `tmm7`), 16 pairs per step;
//! the driver pads the reduced dimension to a multiple of 16 pairs and the rows of `a` to a
//! multiple of 32 with zeros, so every load stays inside its buffer.
//!
//! Linux hands a process the tile state only on request (`arch_prctl(ARCH_REQ_XCOMP_PERM,
//! XFEATURE_XTILEDATA)`); [`usable`] asks once and says no if the kernel refuses, if the CPU lacks
//! AMX-TILE or AMX-BF16, or if `FEDSPINE_ISA` caps our kernels at all (`avx512` keeps the bf16
//! products on `vdpbf16ps`, to compare the two on one host). Each thread configures the tiles
//! before its first block ([`Tiles`]) and releases them after its last.
//!
//! Inline assembly, as the tile instructions have no stable intrinsics; the compiler never
//! allocates tile registers itself, so their contents persist from one `asm!` block to the next.

/// Rows of `a` one block computes (two tiles of 16).
pub const BLOCK_ROWS: usize = 32;
/// Pairs of the reduced dimension per tile step (64 bytes of a tile row).
pub const STEP_PAIRS: usize = 16;
/// Output columns one block computes (two tiles of 16): the width of a packed panel, whose pair
/// rows are therefore `BLOCK_COLS` words apart.
pub const BLOCK_COLS: usize = 32;

/// May the bf16 products use AMX tiles in this process? Detected (and, on Linux, permitted by the
/// kernel) once.
pub fn usable() -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        static USABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *USABLE.get_or_init(|| {
            matches!(crate::cpu::cap_from_env(), Ok(None))
                && crate::cpu::Isa::detect() == crate::cpu::Isa::Avx512
                && std::arch::is_x86_feature_detected!("avx512bf16")
                && x86::has_amx_bf16()
                && x86::request_tile_state()
        })
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    {
        false
    }
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
pub(super) use x86::{block, Tiles};

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
#[allow(unsafe_code)]
mod x86 {
    use super::{BLOCK_COLS, BLOCK_ROWS, STEP_PAIRS};
    use std::arch::asm;

    /// CPUID leaf 7: AMX-BF16 is bit 22 of EDX, AMX-TILE bit 24.
    pub(super) fn has_amx_bf16() -> bool {
        // Leaf 7 exists on every CPU with AVX-512 (the caller checks that first).
        let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
        edx & (1 << 22) != 0 && edx & (1 << 24) != 0
    }

    /// `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`: permission for this process's
    /// threads to use the tile data state. False when the kernel refuses (older than 5.16, or
    /// the state is not enabled).
    pub(super) fn request_tile_state() -> bool {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: a plain system call with two integer arguments; it changes only what the
        // process may use.
        unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            ) == 0
        }
    }

    /// The tile configuration of a thread for [`block`]: palette 1, eight tiles of 16 rows by
    /// 64 bytes. Configured on creation, released on drop.
    pub struct Tiles(());

    #[repr(C, align(64))]
    struct Config([u8; 64]);

    impl Tiles {
        /// Configure this thread's tiles.
        ///
        /// # Safety
        /// [`super::usable`] returned true in this process.
        pub unsafe fn configure() -> Tiles {
            let mut cfg = Config([0; 64]);
            cfg.0[0] = 1; // palette 1
            for t in 0..8 {
                // Bytes 16..32: each tile's bytes per row (u16); bytes 48..56: its rows.
                cfg.0[16 + 2 * t] = 64;
                cfg.0[48 + t] = 16;
            }
            // SAFETY: the configuration is 64 aligned bytes of a valid palette-1 layout, and the
            // process has permission for the tile state (the caller's contract).
            unsafe { asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly)) };
            Tiles(())
        }
    }

    impl Drop for Tiles {
        fn drop(&mut self) {
            // SAFETY: the tiles were configured by this thread (`configure`); releasing them
            // returns the thread to the init state.
            unsafe { asm!("tilerelease", options(nostack, nomem)) };
        }
    }

    /// One block: rows `0..32` of `a` (each `pairs` words, consecutive; `pairs` a multiple of
    /// 16) times one packed panel (`pairs * BLOCK_COLS` words), into the `rows x cols` cells at `c` (row
    /// stride `ldc` values).
    ///
    /// # Safety
    /// The calling thread holds a [`Tiles`]; `a` is readable for `32 * pairs` words (rows past
    /// `rows` are padding), `panel` for `pairs * BLOCK_COLS` words, and `c` writable for `rows` (<= 32)
    /// rows of `cols` (<= BLOCK_COLS) cells.
    pub unsafe fn block(
        a: *const u32,
        pairs: usize,
        panel: *const u32,
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
    ) {
        debug_assert!(pairs.is_multiple_of(STEP_PAIRS) && rows <= BLOCK_ROWS && cols <= BLOCK_COLS);
        let lda = pairs * 4;
        let ldb = BLOCK_COLS * 4;
        // SAFETY: the tiles are configured as 16 x 64 bytes; each load reads 16 rows of 64 bytes
        // inside the buffers the contract names, each store writes 16 rows of 64 bytes inside
        // `c` (direct) or the scratch (edges).
        unsafe {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            );
            for s in 0..pairs / STEP_PAIRS {
                let a0 = a.add(s * STEP_PAIRS);
                let a1 = a0.add(16 * pairs);
                let b0 = panel.add(s * STEP_PAIRS * BLOCK_COLS);
                let b1 = b0.add(16);
                asm!(
                    "tileloadd tmm4, [{a0} + {lda}*1]",
                    "tileloadd tmm6, [{b0} + {ldb}*1]",
                    "tileloadd tmm7, [{b1} + {ldb}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tileloadd tmm5, [{a1} + {lda}*1]",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    a0 = in(reg) a0,
                    a1 = in(reg) a1,
                    b0 = in(reg) b0,
                    b1 = in(reg) b1,
                    lda = in(reg) lda,
                    ldb = in(reg) ldb,
                    options(nostack, readonly)
                );
            }
            if rows == BLOCK_ROWS && cols == BLOCK_COLS {
                store(c, ldc);
            } else {
                let mut scratch = [0f32; BLOCK_ROWS * BLOCK_COLS];
                store(scratch.as_mut_ptr(), BLOCK_COLS);
                for i in 0..rows {
                    std::ptr::copy_nonoverlapping(
                        scratch.as_ptr().add(i * BLOCK_COLS),
                        c.add(i * ldc),
                        cols,
                    );
                }
            }
        }
    }

    /// The four accumulators to a 32 x 32 block at `c` (row stride `ldc` values).
    ///
    /// # Safety
    /// As for [`block`], with `c` writable for 32 rows of 32 cells.
    unsafe fn store(c: *mut f32, ldc: usize) {
        let ld = ldc * 4;
        // SAFETY: the caller's contract.
        unsafe {
            asm!(
                "tilestored [{c0} + {ld}*1], tmm0",
                "tilestored [{c1} + {ld}*1], tmm1",
                "tilestored [{c2} + {ld}*1], tmm2",
                "tilestored [{c3} + {ld}*1], tmm3",
                c0 = in(reg) c,
                c1 = in(reg) c.add(16),
                c2 = in(reg) c.add(16 * ldc),
                c3 = in(reg) c.add(16 * ldc + 16),
                ld = in(reg) ld,
                options(nostack)
            );
        }
    }
}
