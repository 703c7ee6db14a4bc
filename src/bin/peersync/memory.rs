//! The process's memory: mimalloc as the allocator, committing its arena on demand, and no
//! transparent huge pages. Together they set an idle node's RSS (W7).

// redb allocates and frees a page buffer per page it touches; glibc's allocator returns that memory
// to the kernel and faults it back in over and over under write load (W2: ~15 % of the writer).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Opts this process out of transparent huge pages, as Redis does (`disable-thp yes`): with THP
/// "always", each arena mimalloc touches is faulted in and zeroed 2 MiB at a time, which took an idle
/// node from 22 to 36 MiB of RSS. Replay measured the same time without them (~3 % more cycles).
pub(crate) fn disable_transparent_huge_pages() {
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and only sets a flag of this process.
    let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if rc != 0 {
        // Not fatal: the node only uses a little more memory.
        eprintln!("note: could not opt out of transparent huge pages: {}", std::io::Error::last_os_error());
    }
}

/// mimalloc's `mi_option_arena_eager_commit`, by its index in v3's `mi_option_t` (the sys crate has
/// no constant for it).
const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;

/// Has mimalloc commit its arena's memory as it is used, not all at once. An arena committed up
/// front is never purged: memory freed after a burst (start-up, a sync) stays resident. With
/// on-demand commit, freed pages go back to the kernel after mimalloc's purge delay; an idle node
/// measured 22.2 MiB of RSS before and 19.0-19.1 MiB after (W7 idle, two A/B rounds).
///
/// It must run before the first allocation, which reserves the arena, and Rust's runtime allocates
/// before `main`: so it runs from the executable's `.init_array`, which the loader calls before
/// handing over to the runtime. `MIMALLOC_ARENA_EAGER_COMMIT` in the environment, if set, wins.
extern "C" fn commit_allocator_memory_on_demand() {
    // SAFETY: getenv reads the environment the loader set up (no other thread runs yet), and
    // mi_option_set only stores an option's value, which the allocator reads when it reserves an
    // arena.
    unsafe {
        if libc::getenv(c"MIMALLOC_ARENA_EAGER_COMMIT".as_ptr()).is_null() {
            libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0);
        }
    }
}

#[used]
#[link_section = ".init_array"]
static COMMIT_ALLOCATOR_MEMORY_ON_DEMAND: extern "C" fn() = commit_allocator_memory_on_demand;
