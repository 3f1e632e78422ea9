/* The optional accelerator: the hot paths of the pure-Python layers, step for step, in C.
 *
 * Every function here has a pure-Python twin, which is the reference (shared_memory_array/_accel.py
 * says which is used; SHARED_MEMORY_ARRAY_PURE=1 forces the twins). Both write the very same bytes
 * in the very same order and follow one lock and crash protocol, so processes using either share
 * a block:
 *
 * - the heap (_heap.py): alloc, free, extend over a region's words: the same segregated lists,
 *   boundary tags, bitmap, counters and limit;
 * - the dict's table (_dict/_table.py): probe, put (new entry, in-place update, kinds),
 *   entry_value, set_number, unpublish, and the rebuild a put may need;
 * - three whole locked steps of the dict (_dict/_facade.py): get (the seqlock-style read of
 *   _fetch, then a locked read), store (one item) and increment (a raw number). Each takes the
 *   robust mutex, checks the generation and the mutation marker, and does the step with the
 *   protocol of _dict/_journal.py; anything unusual (a holder that died, a repair or a growth
 *   due, a full table or heap, a value that is no raw number) changes nothing and returns None:
 *   the Python path then does the step exactly as without the accelerator;
 * - robust process-shared mutexes and futexes (_platform/_linux.py), the GIL released while
 *   they block;
 * - the first steps of attaching a block (_block.py, _platform/_linux.py): open, fstat, the
 *   shared OFD lock of a mapping's hold, and the header read, in one call.
 *
 * Shared words are stored with release semantics and read with acquire semantics: the compiler
 * keeps the protocol's order of stores, which a process killed at any instruction relies on
 * (on x86 these are plain moves). The limited API of Python 3.10 (no NumPy, no buffer protocol):
 * Python hands over addresses of mappings together with objects that keep them mapped.
 */

#define Py_LIMITED_API 0x030A0000
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* RETURN_NONE/TRUE/FALSE of the 3.12 and 3.13 headers return the singletons without a new
 * reference (immortal there), even for the limited API of 3.10: built with those headers, a
 * module would free None on 3.10 and 3.11. These take the reference on every version. */
#define RETURN_NONE return Py_INCREF(Py_None), Py_None
#define RETURN_TRUE return Py_INCREF(Py_True), Py_True
#define RETURN_FALSE return Py_INCREF(Py_False), Py_False

typedef PyObject *(*fastcall_t)(PyObject *, PyObject *const *, Py_ssize_t);
#define FASTCALL(f) ((PyCFunction)(void (*)(void))(fastcall_t)(f))

/* -- shared words -------------------------------------------------------------------------- */

/* Tests only (kill_after_stores): SIGKILL this process at the n-th shared word store from now,
 * to show that a process killed at any store of a step leaves a block the next taker repairs. */
static long kill_countdown = 0;

static void kill_tick(void) {
    if (--kill_countdown == 0) kill(getpid(), SIGKILL);
}

#define LOAD(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define STORE(p, v)                                                   \
    do {                                                              \
        __atomic_store_n((p), (v), __ATOMIC_RELEASE);                 \
        if (__builtin_expect(kill_countdown != 0, 0)) kill_tick();    \
    } while (0)

static inline unsigned bit_length(uint64_t x) { return x ? 64u - (unsigned)__builtin_clzll(x) : 0u; }

/* -- CRC-32 (zlib's, for rebuilding a table: the key hashes of _keys.key_hash) ----------------- */

static uint32_t crc_table[256];

static void crc_init(void) {
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[n] = c;
    }
}

static uint32_t crc32_of(const uint8_t *data, uint64_t length) {
    uint32_t c = 0xFFFFFFFFu;
    for (uint64_t i = 0; i < length; i++) c = crc_table[(c ^ data[i]) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

/* -- the heap (_heap.py: its docstring is the format) -------------------------------------- */

#define NUM_CLASSES 96
#define MIN_BLOCK 32
#define GRANULE 16
#define TAG_BYTES 16
#define FIRST_FIT_SCAN 16
#define META_WORDS 8
enum { H_MAGIC, H_SIZE, H_LIMIT, H_FREE_BLOCKS, H_FREE_BYTES, H_ALLOCATED, H_BITMAP_LOW, H_BITMAP_HIGH };
#define SIZE_MASK (~(uint64_t)(GRANULE - 1))

typedef struct {
    uint64_t *w;    /* the words of the buffer the heap's offsets are relative to */
    uint64_t base;  /* word index of the region's start */
    uint64_t heads; /* word index of the first list head */
    uint64_t offset, size, first_block, end_block;
} heap_t;

static uint64_t heap_first_block(uint64_t offset) {
    uint64_t first = offset + 8 * (META_WORDS + NUM_CLASSES) + 8; /* past the prologue tag */
    return first + ((8 - (int64_t)first) % GRANULE + GRANULE) % GRANULE;
}

static uint64_t heap_end_for(const heap_t *h, uint64_t limit) {
    uint64_t end = h->offset + (limit < h->size ? limit : h->size) - 8;
    return end - (end - 8) % GRANULE;
}

static void heap_setup(heap_t *h, void *buf, uint64_t offset, uint64_t size, uint64_t end_block) {
    h->w = (uint64_t *)buf;
    h->offset = offset;
    h->size = size;
    h->base = offset >> 3;
    h->heads = h->base + META_WORDS;
    h->first_block = heap_first_block(offset);
    if (end_block) {
        h->end_block = end_block;
    } else { /* the recorded limit's (what Heap.refresh follows) */
        uint64_t limit = LOAD(&h->w[h->base + H_LIMIT]);
        h->end_block = heap_end_for(h, limit ? limit : size);
    }
}

static inline uint64_t size_class(uint64_t size) {
    return size <= 1024 ? (size >> 4) - 2 : 52 + bit_length(size);
}

static void heap_insert(heap_t *h, uint64_t block, uint64_t size) {
    uint64_t *w = h->w, at = block >> 3, klass = size_class(size), head_index = h->heads + klass;
    uint64_t head = w[head_index];
    STORE(&w[at], size);
    STORE(&w[at + (size >> 3) - 1], size);
    STORE(&w[at + 1], head);
    STORE(&w[at + 2], (uint64_t)0);
    if (head)
        STORE(&w[(head >> 3) + 2], block);
    else if (klass < 64)
        STORE(&w[h->base + H_BITMAP_LOW], w[h->base + H_BITMAP_LOW] | (uint64_t)1 << klass);
    else
        STORE(&w[h->base + H_BITMAP_HIGH], w[h->base + H_BITMAP_HIGH] | (uint64_t)1 << (klass - 64));
    STORE(&w[head_index], block);
    STORE(&w[h->base + H_FREE_BLOCKS], w[h->base + H_FREE_BLOCKS] + 1);
    STORE(&w[h->base + H_FREE_BYTES], w[h->base + H_FREE_BYTES] + size);
}

static void heap_unlink(heap_t *h, uint64_t block, uint64_t size) {
    uint64_t *w = h->w, at = block >> 3;
    uint64_t following = w[at + 1], previous = w[at + 2];
    if (previous) {
        STORE(&w[(previous >> 3) + 1], following);
    } else {
        uint64_t klass = size_class(size);
        STORE(&w[h->heads + klass], following);
        if (!following) {
            if (klass < 64)
                STORE(&w[h->base + H_BITMAP_LOW], w[h->base + H_BITMAP_LOW] & ~((uint64_t)1 << klass));
            else
                STORE(&w[h->base + H_BITMAP_HIGH],
                      w[h->base + H_BITMAP_HIGH] & ~((uint64_t)1 << (klass - 64)));
        }
    }
    if (following) STORE(&w[(following >> 3) + 2], previous);
    STORE(&w[h->base + H_FREE_BLOCKS], w[h->base + H_FREE_BLOCKS] - 1);
    STORE(&w[h->base + H_FREE_BYTES], w[h->base + H_FREE_BYTES] - size);
}

static uint64_t heap_first_fit(const heap_t *h, uint64_t need, uint64_t klass) {
    if (klass >= NUM_CLASSES) return 0;
    const uint64_t *w = h->w;
    uint64_t block = w[h->heads + klass];
    for (int i = 0; i < FIRST_FIT_SCAN; i++) {
        if (!block || w[block >> 3] >= need) return block;
        block = w[(block >> 3) + 1];
    }
    return 0;
}

/* The block alloc would carve ``need`` bytes from (0: the heap is full); changes nothing. */
static uint64_t heap_find(const heap_t *h, uint64_t nbytes, uint64_t *need_out) {
    if (nbytes > h->size) return 0; /* no block of a region is that large */
    const uint64_t *w = h->w;
    uint64_t need = (nbytes + TAG_BYTES + GRANULE - 1) & SIZE_MASK, klass, block;
    if (need <= 1024) {
        if (need < MIN_BLOCK) need = MIN_BLOCK;
        klass = (need >> 4) - 2;
        block = w[h->heads + klass];
    } else {
        klass = 52 + bit_length(need);
        block = heap_first_fit(h, need, klass);
    }
    if (!block) {
        uint64_t first = klass + 1;
        uint64_t low = first < 64 ? w[h->base + H_BITMAP_LOW] >> first : 0;
        if (low) {
            klass = first + (uint64_t)__builtin_ctzll(low);
        } else {
            if (first < 64) first = 64;
            uint64_t high = first - 64 < 64 ? w[h->base + H_BITMAP_HIGH] >> (first - 64) : 0;
            if (!high) return 0;
            klass = first + (uint64_t)__builtin_ctzll(high);
        }
        block = w[h->heads + klass];
    }
    *need_out = need;
    return block;
}

/* Heap.alloc: the payload's offset, or 0 when no free block is large enough (heap unchanged). */
static uint64_t heap_alloc(heap_t *h, uint64_t nbytes) {
    uint64_t need = 0, block = heap_find(h, nbytes, &need);
    if (!block) return 0;
    uint64_t *w = h->w, size = w[block >> 3], rest = size - need;
    if (rest < MIN_BLOCK) {
        heap_unlink(h, block, size);
    } else { /* carve from the tail: the free part keeps its place (and usually its list) */
        if (rest > 1024 && bit_length(rest) == bit_length(size)) { /* same class */
            uint64_t at = block >> 3;
            STORE(&w[at], rest);
            STORE(&w[at + (rest >> 3) - 1], rest);
            STORE(&w[h->base + H_FREE_BYTES], w[h->base + H_FREE_BYTES] - need);
        } else {
            heap_unlink(h, block, size);
            heap_insert(h, block, rest);
        }
        block += rest;
        size = need;
    }
    uint64_t at = block >> 3, tag = size | 1;
    STORE(&w[at], tag);
    STORE(&w[at + (size >> 3) - 1], tag);
    STORE(&w[h->base + H_ALLOCATED], w[h->base + H_ALLOCATED] + 1);
    return block + 8;
}

enum { FREE_OK = 0, FREE_NOT_PAYLOAD = 1, FREE_NOT_ALLOCATED = 2 };

/* Heap.free's checks alone: whether ``payload`` is an allocated block of this heap. */
static int heap_free_check(const heap_t *h, uint64_t payload) {
    uint64_t block = payload - 8;
    if (!(h->first_block <= block && block < h->end_block) || (block & 15) != 8)
        return FREE_NOT_PAYLOAD;
    uint64_t tag = h->w[block >> 3], size = tag & SIZE_MASK;
    if (!(tag & 1) || size < MIN_BLOCK || block + size > h->end_block) return FREE_NOT_ALLOCATED;
    return FREE_OK;
}

static int heap_free(heap_t *h, uint64_t payload) {
    int status = heap_free_check(h, payload);
    if (status != FREE_OK) return status;
    uint64_t *w = h->w, block = payload - 8, size = w[block >> 3] & SIZE_MASK;
    STORE(&w[h->base + H_ALLOCATED], w[h->base + H_ALLOCATED] - 1);
    uint64_t following = block + size, following_tag = w[following >> 3];
    if (!(following_tag & 1)) {
        heap_unlink(h, following, following_tag);
        size += following_tag;
    }
    uint64_t previous_tag = w[(block >> 3) - 1];
    if (!(previous_tag & 1)) {
        uint64_t start = block - previous_tag, merged = previous_tag + size;
        if (size_class(merged) == size_class(previous_tag)) { /* grow the free predecessor */
            STORE(&w[start >> 3], merged);
            STORE(&w[(start + merged - 8) >> 3], merged);
            STORE(&w[block >> 3], (uint64_t)0); /* a stale "allocated" tag: no double free */
            STORE(&w[h->base + H_FREE_BYTES], w[h->base + H_FREE_BYTES] + size);
            return FREE_OK;
        }
        heap_unlink(h, start, previous_tag);
        block = start;
        size = merged;
    }
    heap_insert(h, block, size);
    return FREE_OK;
}

/* Heap.extend: raise the limit; returns the new end of the blocks. */
static uint64_t heap_extend(heap_t *h, uint64_t limit) {
    if (limit > h->size) limit = h->size;
    uint64_t old_end = h->end_block, new_end = heap_end_for(h, limit);
    if ((int64_t)(new_end - old_end) < MIN_BLOCK) return old_end;
    uint64_t *w = h->w;
    STORE(&w[new_end >> 3], (uint64_t)1); /* the new epilogue first */
    STORE(&w[h->base + H_LIMIT], limit < h->size ? limit : (uint64_t)0);
    h->end_block = new_end;
    uint64_t block = old_end, size = new_end - old_end, previous_tag = w[(block >> 3) - 1];
    if (block > h->first_block && !(previous_tag & 1)) {
        uint64_t start = block - previous_tag; /* merge with the free block below the epilogue */
        heap_unlink(h, start, previous_tag);
        block = start;
        size += previous_tag;
    }
    heap_insert(h, block, size);
    return new_end;
}

/* -- argument helpers ------------------------------------------------------------------------ */

static int arg_u64(PyObject *object, uint64_t *out) {
    unsigned long long value = PyLong_AsUnsignedLongLong(object);
    if (value == (unsigned long long)-1 && PyErr_Occurred()) return -1;
    *out = (uint64_t)value;
    return 0;
}

static int arg_ptr(PyObject *object, void **out) {
    void *pointer = PyLong_AsVoidPtr(object);
    if (!pointer && PyErr_Occurred()) return -1;
    if (!pointer) {
        PyErr_SetString(PyExc_ValueError, "a null address");
        return -1;
    }
    *out = pointer;
    return 0;
}

static int arg_bytes(PyObject *object, const char **data, Py_ssize_t *length) {
    if (!PyBytes_Check(object)) {
        PyErr_SetString(PyExc_TypeError, "expected bytes");
        return -1;
    }
    return PyBytes_AsStringAndSize(object, (char **)data, length);
}

static int check_nargs(const char *name, Py_ssize_t nargs, Py_ssize_t expected) {
    if (nargs == expected) return 0;
    PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments (%zd given)", name, expected, nargs);
    return -1;
}

/* A tuple of new references (stolen, NULL-safe: a NULL item makes it NULL), built without
 * Py_BuildValue's format parsing (the hot calls return one). */
static PyObject *tuple_of(Py_ssize_t size, PyObject *a, PyObject *b, PyObject *c) {
    PyObject *items[3] = {a, b, c}, *tuple = NULL;
    int ok = 1;
    for (Py_ssize_t i = 0; i < size; i++) ok = ok && items[i];
    if (ok) tuple = PyTuple_New(size);
    for (Py_ssize_t i = 0; i < size; i++) {
        if (tuple)
            PyTuple_SetItem(tuple, i, items[i]);
        else
            Py_XDECREF(items[i]);
    }
    return tuple;
}

#define I64(v) PyLong_FromLongLong((long long)(v))
#define U64(v) PyLong_FromUnsignedLongLong((unsigned long long)(v))

/* heap_alloc(address, offset, size, nbytes) -> payload offset, 0 when the heap is full */
static PyObject *py_heap_alloc(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs) {
    void *address;
    uint64_t offset, size, nbytes;
    heap_t heap;
    if (check_nargs("heap_alloc", nargs, 4) || arg_ptr(args[0], &address) ||
        arg_u64(args[1], &offset) || arg_u64(args[2], &size) || arg_u64(args[3], &nbytes))
        return NULL;
    heap_setup(&heap, address, offset, size, 1);
    return PyLong_FromUnsignedLongLong(heap_alloc(&heap, nbytes));
}

/* heap_free(address, offset, size, end_block, payload) -> 0, or 1/2 (not a payload/allocated) */
static PyObject *py_heap_free(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs) {
    void *address;
    uint64_t offset, size, end_block, payload;
    heap_t heap;
    if (check_nargs("heap_free", nargs, 5) || arg_ptr(args[0], &address) ||
        arg_u64(args[1], &offset) || arg_u64(args[2], &size) || arg_u64(args[3], &end_block) ||
        arg_u64(args[4], &payload))
        return NULL;
    heap_setup(&heap, address, offset, size, end_block);
    return PyLong_FromLong(heap_free(&heap, payload));
}

/* heap_extend(address, offset, size, end_block, limit) -> the new end of the blocks */
static PyObject *py_heap_extend(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs) {
    void *address;
    uint64_t offset, size, end_block, limit;
    heap_t heap;
    if (check_nargs("heap_extend", nargs, 5) || arg_ptr(args[0], &address) ||
        arg_u64(args[1], &offset) || arg_u64(args[2], &size) || arg_u64(args[3], &end_block) ||
        arg_u64(args[4], &limit))
        return NULL;
    heap_setup(&heap, address, offset, size, end_block);
    return PyLong_FromUnsignedLongLong(heap_extend(&heap, limit));
}

/* -- the dict's table (_dict/_layout.py: its docstring is the format) ------------------------- */

enum { C_VERSION, C_COUNT, C_TOMBSTONES, C_ACTIVE, C_HOLDER_PID, C_HOLDER_START, C_REPAIRS,
       C_JOURNAL, C_SUPERSEDED };
#define OFFSET_BITS 40
#define OFFSET_MASK (((uint64_t)1 << OFFSET_BITS) - 1)
#define TAG_MASK (~OFFSET_MASK)
#define TOMBSTONE 1
#define ENTRY_HEADER 24
#define HIGH_BIT ((uint64_t)1 << 63)
#define LOW63 (HIGH_BIT - 1)
#define KIND_SHIFT 60
#define KIND_MASK ((uint64_t)7 << KIND_SHIFT)
#define LENGTH_MASK (((uint64_t)1 << KIND_SHIFT) - 1)
#define KIND_PICKLED 0
#define KIND_INT64 1
#define KIND_FLOAT64 2
#define TWO_AREA_LIMIT 256

/* Status codes of the table's steps (the Python side raises the errors they stand for). */
enum { ST_OK = 0, ST_TABLE_FULL = -1, ST_HEAP_FULL = -2, ST_NO_EMPTY_SLOT = -3, ST_CORRUPT = -4,
       ST_BAD_FREE = -5, ST_RACED = -6 };

static inline uint64_t key_room(uint64_t sizes) {
    return ((sizes & 0xFFFFFFFF) + (sizes >> 32) + 7) & ~(uint64_t)7;
}

typedef struct {
    PyObject_HEAD
    PyObject *pins; /* objects that keep the mappings below mapped (views of them) */
    PyObject *identity; /* _process.current_identity */
    uint64_t *ctl;
    uint64_t *tables[2];
    uint8_t *hbuf; /* the heap region: entries and heap offsets are relative to it */
    uint64_t hbuf_len, heap_size, slots, mask, shift, max_items, fill_limit;
    /* The entry block (bind_lock): the mutex, the generation word, the notify words. */
    pthread_mutex_t *mutex;
    uint64_t *generation_word;
    uint64_t generation;
    uint32_t *notify, *waiters;
    uint64_t pid, start, epoch;
    int wake_due; /* core_end saw waiters: core_unlock wakes them once the mutex is free */
} Core;

static uint64_t fork_epoch = 1; /* bumped in a forked child: the identity is read again */

static void after_fork_in_child(void) { fork_epoch++; }

static inline uint64_t *active_table(Core *c) { return c->tables[LOAD(&c->ctl[C_ACTIVE]) & 1]; }

static inline heap_t core_heap(Core *c) {
    heap_t heap;
    heap_setup(&heap, c->hbuf, 0, c->heap_size, 0);
    return heap;
}

/* Whether ``length`` bytes at ``start`` lie in the heap region (they are read or written). */
static inline int in_heap(Core *c, uint64_t start, uint64_t length) {
    return start <= c->hbuf_len && length <= c->hbuf_len - start;
}

typedef struct {
    int64_t index;
    uint64_t word;
    int64_t insert_at;
} probe_t;

/* Whether the entry at ``entry`` has key ``encoded`` (Table.probe's comparison: the sizes word
 * at entry >> 3, then the key bytes, a slice past the region's end comparing unequal). A word
 * index past the region is ST_CORRUPT with ``strict`` (the Python twin's IndexError under the
 * lock), else ST_RACED (a lock-free read met a change: the locked path reads again). */
static int entry_has_key(Core *c, uint64_t entry, const char *encoded, uint64_t length, int strict,
                         int *status) {
    uint64_t at = entry >> 3;
    if (at >= c->hbuf_len >> 3) {
        *status = strict ? ST_CORRUPT : ST_RACED;
        return 0;
    }
    uint64_t sizes = LOAD((uint64_t *)c->hbuf + at);
    if ((sizes & 0xFFFFFFFF) != length) return 0;
    uint64_t start = entry + ENTRY_HEADER;
    return in_heap(c, start, length) && memcmp(c->hbuf + start, encoded, length) == 0;
}

/* Table.probe (and _probe_chain) over the active table. ``strict``: see entry_has_key. */
static int probe(Core *c, const char *encoded, uint64_t length, uint64_t key_hash, int strict,
                 probe_t *out) {
    uint64_t *table = active_table(c);
    uint64_t index = ((key_hash * 0x9E3779B1ull) & 0xFFFFFFFFull) >> c->shift;
    uint64_t word = LOAD(&table[index]);
    int status = ST_OK;
    if (!word) {
        *out = (probe_t){-1, 0, (int64_t)index};
        return ST_OK;
    }
    uint64_t tag = (key_hash & 0xFFFFFF) << OFFSET_BITS;
    if ((word & TAG_MASK) == tag) { /* the common hit: the key in its home slot */
        if (entry_has_key(c, word & OFFSET_MASK, encoded, length, strict, &status)) {
            *out = (probe_t){(int64_t)index, word, -1};
            return ST_OK;
        }
        if (status) return status;
    }
    int64_t insert_at = word == TOMBSTONE ? (int64_t)index : -1;
    for (uint64_t i = 0; i < c->slots; i++) {
        index = (index + 1) & c->mask;
        word = LOAD(&table[index]);
        if (!word) {
            if (insert_at < 0)
                *out = (probe_t){-1, 0, (int64_t)index};
            else
                *out = (probe_t){-1, TOMBSTONE, insert_at};
            return ST_OK;
        }
        if (word == TOMBSTONE) {
            if (insert_at < 0) insert_at = (int64_t)index;
        } else if ((word & TAG_MASK) == tag) {
            if (entry_has_key(c, word & OFFSET_MASK, encoded, length, strict, &status)) {
                *out = (probe_t){(int64_t)index, word, insert_at};
                return ST_OK;
            }
            if (status) return status;
        }
    }
    if (insert_at >= 0) {
        *out = (probe_t){-1, TOMBSTONE, insert_at};
        return ST_OK;
    }
    return strict ? ST_NO_EMPTY_SLOT : ST_RACED;
}

static inline uint64_t hword(Core *c, uint64_t offset) { return LOAD((uint64_t *)(c->hbuf + offset)); }
static inline void set_hword(Core *c, uint64_t offset, uint64_t value) {
    STORE((uint64_t *)(c->hbuf + offset), value);
}

/* Table.rebuild() of the live slots (the rebuild a put may need). */
static int rebuild(Core *c) {
    uint64_t active = LOAD(&c->ctl[C_ACTIVE]) & 1, *source = c->tables[active];
    uint64_t *target = c->tables[1 - active], live = 0;
    for (uint64_t i = 0; i < c->slots; i++)
        if (source[i] > TOMBSTONE) live++;
    if (live >= c->fill_limit) return ST_CORRUPT;
    memset(target, 0, 8 * c->slots);
    for (uint64_t i = 0; i < c->slots; i++) {
        uint64_t word = source[i];
        if (word <= TOMBSTONE) continue;
        uint64_t entry = word & OFFSET_MASK, start = entry + ENTRY_HEADER;
        uint64_t length = hword(c, entry) & 0xFFFFFFFF;
        if (start > c->hbuf_len) length = 0;
        else if (length > c->hbuf_len - start) length = c->hbuf_len - start;
        uint64_t key_hash = crc32_of(c->hbuf + start, length);
        uint64_t index = ((key_hash * 0x9E3779B1ull) & 0xFFFFFFFFull) >> c->shift;
        while (target[index]) index = (index + 1) & c->mask;
        STORE(&target[index], (key_hash & 0xFFFFFF) << OFFSET_BITS | entry);
    }
    STORE(&c->ctl[C_ACTIVE], 1 - active);
    STORE(&c->ctl[C_TOMBSTONES], (uint64_t)0);
    return ST_OK;
}

typedef struct {
    const char *encoded, *original, *data;
    Py_ssize_t encoded_length, original_length, length;
    uint64_t key_hash, kind;
} item_t;

/* What a put will do, decided before anything changes. */
typedef struct {
    probe_t found;
    int in_place;
    uint64_t areas_word, room, nbytes;
    const char *original;
    uint64_t original_length;
} plan_t;

static void two_areas(uint64_t length, uint64_t *areas_word, uint64_t *room) {
    uint64_t area = (length + (length >> 2) + 7) & ~(uint64_t)7;
    if (area < 16) area = 16;
    *areas_word = HIGH_BIT | area;
    *room = 2 * area;
}

/* The part of Table.put before its first store: probe, in place or a new entry, the count. */
static int plan_put(Core *c, const item_t *item, int journal, plan_t *plan) {
    int status = probe(c, item->encoded, (uint64_t)item->encoded_length, item->key_hash, 1,
                       &plan->found);
    if (status) return status;
    uint64_t length = (uint64_t)item->length;
    plan->in_place = 0;
    plan->original = item->original;
    plan->original_length = (uint64_t)item->original_length;
    if (plan->found.index >= 0) {
        uint64_t old_entry = plan->found.word & OFFSET_MASK;
        if (!in_heap(c, old_entry, ENTRY_HEADER) || old_entry & 7) return ST_CORRUPT;
        uint64_t sizes = hword(c, old_entry), areas_word = hword(c, old_entry + 16);
        if (!journal && areas_word & HIGH_BIT && length <= (areas_word & LOW63)) {
            uint64_t start = old_entry + ENTRY_HEADER + key_room(sizes);
            if (!in_heap(c, start, 2 * (areas_word & LOW63))) return ST_CORRUPT;
            plan->in_place = 1;
            return ST_OK;
        }
        if (sizes >> 32) { /* keep the key as first inserted, as a dict does */
            uint64_t start = old_entry + ENTRY_HEADER + (sizes & 0xFFFFFFFF);
            if (!in_heap(c, start, sizes >> 32)) return ST_CORRUPT;
            plan->original = (const char *)c->hbuf + start;
            plan->original_length = sizes >> 32;
        } else {
            plan->original = "";
            plan->original_length = 0;
        }
        if (length <= TWO_AREA_LIMIT)
            two_areas(length, &plan->areas_word, &plan->room);
        else
            plan->areas_word = plan->room = length;
    } else {
        uint64_t count = LOAD(&c->ctl[C_COUNT]);
        if (count >= c->max_items) return ST_TABLE_FULL;
        plan->areas_word = plan->room = length > 8 ? length : 8; /* born compact */
    }
    uint64_t sizes = (uint64_t)item->encoded_length | plan->original_length << 32;
    plan->nbytes = ENTRY_HEADER + key_room(sizes) + plan->room;
    return ST_OK;
}

static inline int needs_rebuild(Core *c, const plan_t *plan) {
    return plan->found.index < 0 &&
           LOAD(&c->ctl[C_COUNT]) + LOAD(&c->ctl[C_TOMBSTONES]) >= c->fill_limit &&
           !plan->found.word;
}

/* The rest of Table.put: every store, in the Python twin's order. The allocation must succeed
 * (checked before by the caller, or reported as ST_HEAP_FULL with nothing written). */
static int finish_put(Core *c, heap_t *heap, const item_t *item, plan_t *plan,
                      uint64_t journal_offset, int64_t *index_out, uint64_t *replaced_out) {
    uint64_t length = (uint64_t)item->length;
    if (plan->in_place) {
        uint64_t old_entry = plan->found.word & OFFSET_MASK;
        uint64_t sizes = hword(c, old_entry), state = hword(c, old_entry + 8);
        uint64_t areas_word = hword(c, old_entry + 16);
        uint64_t start = old_entry + ENTRY_HEADER + key_room(sizes);
        if (!(state & HIGH_BIT)) start += areas_word & LOW63;
        memcpy(c->hbuf + start, item->data, length);
        set_hword(c, old_entry + 8, (~state & HIGH_BIT) | item->kind << KIND_SHIFT | length);
        *index_out = plan->found.index;
        *replaced_out = 0;
        return ST_OK;
    }
    if (needs_rebuild(c, plan)) {
        int status = rebuild(c);
        if (status) return status;
        status = probe(c, item->encoded, (uint64_t)item->encoded_length, item->key_hash, 1,
                       &plan->found);
        if (status) return status;
    }
    int64_t index = plan->found.index >= 0 ? plan->found.index : plan->found.insert_at;
    uint64_t old_word = plan->found.word;
    uint64_t sizes = (uint64_t)item->encoded_length | plan->original_length << 32;
    uint64_t key_bytes = key_room(sizes);
    uint64_t entry = heap_alloc(heap, plan->nbytes);
    if (!entry) return ST_HEAP_FULL;
    uint64_t start = entry + ENTRY_HEADER;
    set_hword(c, entry, sizes);
    set_hword(c, entry + 8, item->kind << KIND_SHIFT | length);
    set_hword(c, entry + 16, plan->areas_word);
    memcpy(c->hbuf + start, item->encoded, (size_t)item->encoded_length);
    if (plan->original_length)
        memmove(c->hbuf + start + item->encoded_length, plan->original, plan->original_length);
    memcpy(c->hbuf + start + key_bytes, item->data, length);
    if (journal_offset) { /* UpdateJournal.record: the record, then its count */
        uint64_t records = hword(c, journal_offset);
        set_hword(c, journal_offset + 16 + 16 * records, (uint64_t)index);
        set_hword(c, journal_offset + 24 + 16 * records, old_word);
        set_hword(c, journal_offset, records + 1);
    }
    uint64_t *table = active_table(c);
    STORE(&table[index], (item->key_hash & 0xFFFFFF) << OFFSET_BITS | entry); /* publish */
    if (old_word <= TOMBSTONE) { /* a new key */
        STORE(&c->ctl[C_COUNT], c->ctl[C_COUNT] + 1);
        if (old_word) STORE(&c->ctl[C_TOMBSTONES], c->ctl[C_TOMBSTONES] - 1);
    }
    *index_out = index;
    *replaced_out = old_word;
    return ST_OK;
}

/* Table.unpublish: empty slot ``index`` (holding ``word``), then free its entry. */
static int unpublish(Core *c, heap_t *heap, uint64_t index, uint64_t word) {
    uint64_t *table = active_table(c);
    if (table[(index + 1) & c->mask]) {
        STORE(&table[index], (uint64_t)TOMBSTONE);
        STORE(&c->ctl[C_TOMBSTONES], c->ctl[C_TOMBSTONES] + 1);
    } else {
        STORE(&table[index], (uint64_t)0); /* nothing probes past an empty successor */
    }
    STORE(&c->ctl[C_COUNT], c->ctl[C_COUNT] - 1);
    return heap_free(heap, word & OFFSET_MASK);
}

/* -- the Core type: one mapped data block (and, bound, its dict's entry block) ---------------- */

static int Core_init(Core *self, PyObject *args, PyObject *kwargs) {
    PyObject *pins, *ctl, *table0, *table1, *hbuf;
    unsigned long long hbuf_len, slots, max_items, fill_limit;
    static char *keywords[] = {"pins", "ctl", "table0", "table1", "slots", "hbuf", "hbuf_len",
                               "max_items", "fill_limit", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOKOKKK", keywords, &pins, &ctl, &table0,
                                     &table1, &slots, &hbuf, &hbuf_len, &max_items, &fill_limit))
        return -1;
    if (slots < 8 || slots & (slots - 1) || slots > ((uint64_t)1 << 31)) {
        PyErr_SetString(PyExc_ValueError, "slots must be a power of two in [8, 2**31]");
        return -1;
    }
    if (arg_ptr(ctl, (void **)&self->ctl) || arg_ptr(table0, (void **)&self->tables[0]) ||
        arg_ptr(table1, (void **)&self->tables[1]) || arg_ptr(hbuf, (void **)&self->hbuf))
        return -1;
    PyObject *old = self->pins;
    Py_INCREF(pins);
    self->pins = pins;
    Py_XDECREF(old);
    self->hbuf_len = hbuf_len;
    self->heap_size = hbuf_len;
    self->slots = slots;
    self->mask = slots - 1;
    self->shift = 32 - (bit_length(slots) - 1);
    self->max_items = max_items;
    self->fill_limit = fill_limit;
    return 0;
}

static void Core_dealloc(Core *self) {
    PyTypeObject *type = Py_TYPE(self);
    Py_CLEAR(self->pins);
    Py_CLEAR(self->identity);
    freefunc tp_free = (freefunc)PyType_GetSlot(type, Py_tp_free);
    tp_free(self);
    Py_DECREF(type);
}

/* bind_lock(pins, mutex, generation_word, generation, notify, waiters, identity): the entry
 * block's words, for the whole locked steps (notify and waiters 0 where the block has none). */
static PyObject *Core_bind_lock(Core *self, PyObject *const *args, Py_ssize_t nargs) {
    void *mutex, *generation_word;
    uint64_t generation, notify, waiters;
    if (check_nargs("bind_lock", nargs, 7) || arg_ptr(args[1], &mutex) ||
        arg_ptr(args[2], &generation_word) || arg_u64(args[3], &generation) ||
        arg_u64(args[4], &notify) || arg_u64(args[5], &waiters))
        return NULL;
    if (!PyCallable_Check(args[6])) {
        PyErr_SetString(PyExc_TypeError, "identity must be callable");
        return NULL;
    }
    PyObject *pins = PyTuple_Pack(2, self->pins ? self->pins : Py_None, args[0]);
    if (!pins) return NULL;
    PyObject *old_pins = self->pins, *old_identity = self->identity;
    self->pins = pins;
    Py_INCREF(args[6]);
    self->identity = args[6];
    Py_XDECREF(old_pins);
    Py_XDECREF(old_identity);
    self->mutex = mutex;
    self->generation_word = generation_word;
    self->generation = generation;
    self->notify = (uint32_t *)(uintptr_t)notify;
    self->waiters = (uint32_t *)(uintptr_t)waiters;
    self->epoch = 0;
    RETURN_NONE;
}

static PyObject *table_error(int status) {
    /* Only reached where the Python wrapper does not turn a status into its error itself. */
    PyErr_Format(PyExc_RuntimeError, "table status %d", status);
    return NULL;
}

/* probe(encoded, key_hash) -> (index, word, insert_at), or a negative status */
static PyObject *Core_probe(Core *self, PyObject *const *args, Py_ssize_t nargs) {
    const char *encoded;
    Py_ssize_t length;
    uint64_t key_hash;
    probe_t found;
    if (check_nargs("probe", nargs, 2) || arg_bytes(args[0], &encoded, &length) ||
        arg_u64(args[1], &key_hash))
        return NULL;
    int status = probe(self, encoded, (uint64_t)length, key_hash, 1, &found);
    if (status) return PyLong_FromLong(status);
    return tuple_of(3, I64(found.index), U64(found.word), I64(found.insert_at));
}

/* entry_value(entry) -> (kind, start, length) of the current value area */
static PyObject *Core_entry_value(Core *self, PyObject *const *args, Py_ssize_t nargs) {
    uint64_t entry;
    if (check_nargs("entry_value", nargs, 1) || arg_u64(args[0], &entry)) return NULL;
    if (!in_heap(self, entry, ENTRY_HEADER) || entry & 7) {
        PyErr_SetString(PyExc_IndexError, "entry offset outside the heap");
        return NULL;
    }
    uint64_t state = hword(self, entry + 8);
    uint64_t start = entry + ENTRY_HEADER + key_room(hword(self, entry));
    if (state & HIGH_BIT) start += hword(self, entry + 16) & LOW63;
    return tuple_of(3, U64((state & KIND_MASK) >> KIND_SHIFT), U64(start), U64(state & LENGTH_MASK));
}

static int parse_item(PyObject *const *args, item_t *item) {
    unsigned long long kind;
    if (arg_bytes(args[0], &item->encoded, &item->encoded_length) ||
        arg_u64(args[1], &item->key_hash) ||
        arg_bytes(args[2], &item->original, &item->original_length))
        return -1;
    kind = PyLong_AsUnsignedLongLong(args[3]);
    if (kind == (unsigned long long)-1 && PyErr_Occurred()) return -1;
    if (kind > 7) {
        PyErr_SetString(PyExc_ValueError, "a value kind is 0 to 7");
        return -1;
    }
    item->kind = kind;
    if (arg_bytes(args[4], &item->data, &item->length)) return -1;
    if ((uint64_t)item->encoded_length > 0xFFFFFFFF || (uint64_t)item->original_length > 0xFFFFFFFF) {
        PyErr_SetString(PyExc_ValueError, "a key of 4 GiB or more");
        return -1;
    }
    return 0;
}

/* put(encoded, key_hash, original, kind, data, journal_offset) -> (index, replaced word),
 * or a negative status: ST_TABLE_FULL and ST_HEAP_FULL (the heap request, in .nbytes) change
 * nothing but the rebuild a put may need first, as the Python twin. */
static PyObject *Core_put(Core *self, PyObject *const *args, Py_ssize_t nargs) {
    item_t item;
    plan_t plan;
    uint64_t journal_offset;
    int64_t index;
    uint64_t replaced;
    if (check_nargs("put", nargs, 6) || parse_item(args, &item) || arg_u64(args[5], &journal_offset))
        return NULL;
    heap_t heap = core_heap(self);
    int status = plan_put(self, &item, journal_offset != 0, &plan);
    if (!status)
        status = finish_put(self, &heap, &item, &plan, journal_offset, &index, &replaced);
    if (status == ST_HEAP_FULL) return tuple_of(2, I64(status), U64(plan.nbytes), NULL);
    if (status) return PyLong_FromLong(status);
    return tuple_of(2, I64(index), U64(replaced), NULL);
}

/* set_number(entry, kind, raw) -> whether the number was replaced with one store */
static PyObject *Core_set_number(Core *self, PyObject *const *args, Py_ssize_t nargs) {
    uint64_t entry, kind;
    const char *raw;
    Py_ssize_t length;
    if (check_nargs("set_number", nargs, 3) || arg_u64(args[0], &entry) || arg_u64(args[1], &kind) ||
        arg_bytes(args[2], &raw, &length))
        return NULL;
    if (!in_heap(self, entry, ENTRY_HEADER) || entry & 7 || kind > 7) {
        PyErr_SetString(PyExc_IndexError, "entry offset outside the heap");
        return NULL;
    }
    uint64_t state = hword(self, entry + 8), areas_word = hword(self, entry + 16);
    uint64_t old_kind = (state & KIND_MASK) >> KIND_SHIFT;
    if ((old_kind != KIND_INT64 && old_kind != KIND_FLOAT64) || length != 8) RETURN_FALSE;
    uint64_t start = entry + ENTRY_HEADER + key_room(hword(self, entry));
    if (areas_word & HIGH_BIT) { /* two areas: write the spare one, then flip (one store) */
        if (!(state & HIGH_BIT)) start += areas_word & LOW63;
        if (!in_heap(self, start, 8)) goto outside;
        memcpy(self->hbuf + start, raw, 8);
        set_hword(self, entry + 8, (~state & HIGH_BIT) | kind << KIND_SHIFT | 8);
        RETURN_TRUE;
    }
    if (kind != old_kind) RETURN_FALSE;
    if (!in_heap(self, start, 8)) goto outside;
    uint64_t word;
    memcpy(&word, raw, 8);
    set_hword(self, start, word); /* one aligned 8-byte store */
    RETURN_TRUE;
outside:
    PyErr_SetString(PyExc_IndexError, "value area outside the heap");
    return NULL;
}

/* unpublish(index, word) -> 0, or the heap's free status (1, 2) once the slot is emptied */
static PyObject *Core_unpublish(Core *self, PyObject *const *args, Py_ssize_t nargs) {
    uint64_t index, word;
    if (check_nargs("unpublish", nargs, 2) || arg_u64(args[0], &index) || arg_u64(args[1], &word))
        return NULL;
    if (index >= self->slots) {
        PyErr_SetString(PyExc_IndexError, "slot index out of range");
        return NULL;
    }
    heap_t heap = core_heap(self);
    return PyLong_FromLong(unpublish(self, &heap, index, word));
}

/* -- the whole locked steps ------------------------------------------------------------------ */

static PyObject *os_error(int error, const char *what) {
    PyObject *exc = PyObject_CallFunction(PyExc_OSError, "is", error, what);
    if (exc) {
        PyErr_SetObject(PyExc_OSError, exc);
        Py_DECREF(exc);
    }
    return NULL;
}

static PyObject *mutex_error(int error, const char *verb) {
    char message[160];
    snprintf(message, sizeof message, "cannot %s the dict's mutex: %s", verb, strerror(error));
    return os_error(error, message);
}

#ifndef LOCK_SPINS
#define LOCK_SPINS 200
#endif

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* pthread_mutex_lock, the GIL released while it blocks. A holder keeps the dict's mutex for
 * a fraction of a microsecond: a short spin of trylock (no system call, no sleep) takes it
 * far more often than not, and only then does a waiter sleep in the kernel. */
static int lock_mutex(pthread_mutex_t *mutex) {
    int error = pthread_mutex_trylock(mutex);
    for (int spin = 0; error == EBUSY && spin < LOCK_SPINS; spin++) {
        cpu_relax();
        error = pthread_mutex_trylock(mutex);
    }
    if (error == EBUSY) {
        Py_BEGIN_ALLOW_THREADS
        error = pthread_mutex_lock(mutex);
        Py_END_ALLOW_THREADS
    }
    return error;
}

static void futex_bump(uint32_t *word) {
    __atomic_add_fetch(word, 1, __ATOMIC_SEQ_CST);
    syscall(SYS_futex, word, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

enum { LOCKED = 0, UNUSUAL = 1, FAILED = -1 };

/* Take the dict's mutex and check what _acquire checks. LOCKED: held, the step can go on.
 * UNUSUAL: not held (a holder died, a growth to follow, a repair due: the Python path does
 * it; a dead holder's mutex is made consistent first, its marker says whether to repair).
 * FAILED: an error is set. */
static int core_lock(Core *c) {
    int error = lock_mutex(c->mutex);
    if (error == EOWNERDEAD) {
        pthread_mutex_consistent(c->mutex);
        pthread_mutex_unlock(c->mutex);
        return UNUSUAL;
    }
    if (error) {
        mutex_error(error, "lock");
        return FAILED;
    }
    if (LOAD(c->generation_word) != c->generation || LOAD(&c->ctl[C_HOLDER_PID])) {
        pthread_mutex_unlock(c->mutex);
        return UNUSUAL;
    }
    return LOCKED;
}

static int core_unlock(Core *c) {
    int error = pthread_mutex_unlock(c->mutex);
    if (c->wake_due) {
        c->wake_due = 0;
        futex_bump(c->notify);
    }
    if (error) {
        mutex_error(error, "unlock");
        return -1;
    }
    return 0;
}

/* The identity (pid, start time) a mutation marker records: _process.current_identity(). */
static int core_identity(Core *c) {
    if (c->epoch == fork_epoch) return 0;
    PyObject *identity = PyObject_CallObject(c->identity, NULL);
    if (!identity) return -1;
    unsigned long long pid, start;
    int ok = PyArg_ParseTuple(identity, "KK", &pid, &start);
    Py_DECREF(identity);
    if (!ok) return -1;
    c->pid = pid;
    c->start = start;
    c->epoch = fork_epoch;
    return 0;
}

/* Journal.begin: the marker (start, then pid), then the version; returns the new version. */
static uint64_t core_begin(Core *c) {
    STORE(&c->ctl[C_HOLDER_START], c->start);
    STORE(&c->ctl[C_HOLDER_PID], c->pid);
    uint64_t version = c->ctl[C_VERSION] + 1;
    STORE(&c->ctl[C_VERSION], version);
    return version;
}

/* Journal.end; whoever waits for a change is woken by core_unlock, after the mutex is
 * released (a waiter woken while it is held would sleep again on the mutex at once).
 * Nothing is lost: a waiter counted in later evaluates its predicate after this change. */
static void core_end(Core *c) {
    STORE(&c->ctl[C_HOLDER_PID], (uint64_t)0);
    c->wake_due = c->notify && LOAD(c->waiters);
}

static int core_bound(Core *c) {
    if (c->mutex) return 0;
    PyErr_SetString(PyExc_RuntimeError, "bind_lock() first");
    return -1;
}

/* get(encoded, key_hash, lock_free, may_lock) -> (version, kind, bytes or None), or None when
 * the Python path must read (a racing writer with may_lock false, anything unusual). */
static PyObject *Core_get(Core *self, PyObject *const *args, Py_ssize_t nargs) {
    const char *encoded;
    Py_ssize_t length;
    uint64_t key_hash;
    probe_t found;
    if (check_nargs("get", nargs, 4) || arg_bytes(args[0], &encoded, &length) ||
        arg_u64(args[1], &key_hash) || core_bound(self))
        return NULL;
    int lock_free = PyObject_IsTrue(args[2]), may_lock = PyObject_IsTrue(args[3]);
    if (lock_free < 0 || may_lock < 0) return NULL;
    if (lock_free) { /* _fetch's seqlock-style read: it counts if the version did not move */
        uint64_t version = LOAD(&self->ctl[C_VERSION]);
        if (!LOAD(&self->ctl[C_HOLDER_PID]) &&
            probe(self, encoded, (uint64_t)length, key_hash, 0, &found) == ST_OK) {
            PyObject *value = NULL;
            uint64_t kind = 0;
            int torn = 0;
            if (found.index >= 0) {
                uint64_t entry = found.word & OFFSET_MASK;
                if (in_heap(self, entry, ENTRY_HEADER) && !(entry & 7)) {
                    uint64_t state = hword(self, entry + 8);
                    uint64_t start = entry + ENTRY_HEADER + key_room(hword(self, entry));
                    if (state & HIGH_BIT) start += hword(self, entry + 16) & LOW63;
                    uint64_t size = state & LENGTH_MASK;
                    kind = (state & KIND_MASK) >> KIND_SHIFT;
                    if (in_heap(self, start, size)) {
                        value = PyBytes_FromStringAndSize((const char *)self->hbuf + start,
                                                          (Py_ssize_t)size);
                        if (!value) return NULL;
                    } else {
                        torn = 1;
                    }
                } else {
                    torn = 1;
                }
            }
            __atomic_thread_fence(__ATOMIC_ACQUIRE);
            if (!torn && LOAD(&self->ctl[C_VERSION]) == version) {
                if (!value) {
                    Py_INCREF(Py_None);
                    value = Py_None;
                }
                return tuple_of(3, U64(version), U64(kind), value);
            }
            Py_XDECREF(value);
        }
    }
    if (!may_lock) RETURN_NONE;
    int locked = core_lock(self);
    if (locked == FAILED) return NULL;
    if (locked == UNUSUAL) RETURN_NONE;
    int status = probe(self, encoded, (uint64_t)length, key_hash, 1, &found);
    const char *start = NULL;
    uint64_t kind = 0, size = 0;
    if (!status && found.index >= 0) {
        uint64_t entry = found.word & OFFSET_MASK;
        if (!in_heap(self, entry, ENTRY_HEADER) || entry & 7) {
            status = ST_CORRUPT;
        } else {
            uint64_t state = hword(self, entry + 8);
            uint64_t at = entry + ENTRY_HEADER + key_room(hword(self, entry));
            if (state & HIGH_BIT) at += hword(self, entry + 16) & LOW63;
            size = state & LENGTH_MASK;
            kind = (state & KIND_MASK) >> KIND_SHIFT;
            if (!in_heap(self, at, size)) status = ST_CORRUPT;
            start = (const char *)self->hbuf + at;
        }
    }
    if (status) { /* the Python path meets it again and raises as it always did */
        if (core_unlock(self)) return NULL;
        RETURN_NONE;
    }
    PyObject *value = start ? PyBytes_FromStringAndSize(start, (Py_ssize_t)size) : Py_None;
    if (!start) Py_INCREF(Py_None);
    uint64_t version = self->ctl[C_VERSION];
    if (core_unlock(self)) {
        Py_XDECREF(value);
        return NULL;
    }
    if (!value) return NULL;
    return tuple_of(3, U64(version), U64(kind), value);
}

/* store(encoded, key_hash, original, kind, data) -> the new version, or None when the Python
 * path must do it (anything unusual, a rebuild or growth due, a full table or heap). One
 * mutation: begin, put, free what it replaced, end (SharedDict.__setitem__ under the lock). */
static PyObject *Core_store(Core *self, PyObject *const *args, Py_ssize_t nargs) {
    item_t item;
    plan_t plan;
    int64_t index;
    uint64_t replaced, need;
    if (check_nargs("store", nargs, 5) || parse_item(args, &item) || core_bound(self) ||
        core_identity(self))
        return NULL;
    int locked = core_lock(self);
    if (locked == FAILED) return NULL;
    if (locked == UNUSUAL) RETURN_NONE;
    heap_t heap = core_heap(self);
    int status = plan_put(self, &item, 0, &plan);
    if (!status && !plan.in_place) {
        if (needs_rebuild(self, &plan) || !heap_find(&heap, plan.nbytes, &need))
            status = ST_HEAP_FULL; /* the Python path rebuilds, or makes room */
        else if (plan.found.word > TOMBSTONE &&
                 heap_free_check(&heap, plan.found.word & OFFSET_MASK) != FREE_OK)
            status = ST_BAD_FREE;
    }
    if (status) {
        if (core_unlock(self)) return NULL;
        RETURN_NONE;
    }
    uint64_t version = core_begin(self);
    status = finish_put(self, &heap, &item, &plan, 0, &index, &replaced);
    if (!status && replaced > TOMBSTONE) heap_free(&heap, replaced & OFFSET_MASK);
    if (status) { /* cannot happen: checked above; the marker stays for the next taker */
        pthread_mutex_unlock(self->mutex);
        return table_error(status);
    }
    core_end(self);
    if (core_unlock(self)) return NULL;
    return PyLong_FromUnsignedLongLong(version);
}

/* increment(encoded, key_hash, amount) -> (new version, new value), or None when the Python
 * path must do it (the key is absent, its value is no raw number, an int result leaves 64
 * bits, a one-area entry would change kind, anything unusual). One mutation: begin, the
 * number's store (Table.set_number), end. */
static PyObject *Core_increment(Core *self, PyObject *const *args, Py_ssize_t nargs) {
    const char *encoded;
    Py_ssize_t length;
    uint64_t key_hash;
    probe_t found;
    if (check_nargs("increment", nargs, 3) || arg_bytes(args[0], &encoded, &length) ||
        arg_u64(args[1], &key_hash) || core_bound(self) || core_identity(self))
        return NULL;
    PyObject *amount = args[2];
    int amount_float = PyFloat_CheckExact(amount);
    long long int_amount = 0;
    double float_amount = 0;
    if (amount_float) {
        float_amount = PyFloat_AsDouble(amount);
    } else if (PyLong_CheckExact(amount)) {
        int overflow;
        int_amount = PyLong_AsLongLongAndOverflow(amount, &overflow);
        if (overflow) RETURN_NONE;
        if (int_amount == -1 && PyErr_Occurred()) return NULL;
    } else {
        RETURN_NONE;
    }
    int locked = core_lock(self);
    if (locked == FAILED) return NULL;
    if (locked == UNUSUAL) RETURN_NONE;
    int status = probe(self, encoded, (uint64_t)length, key_hash, 1, &found);
    uint64_t entry = status ? 0 : found.word & OFFSET_MASK, start = 0, new_kind = 0, raw = 0, state = 0;
    uint64_t areas_word = 0;
    long long int_result = 0;
    double float_result = 0;
    int ok = 0;
    if (!status && found.index >= 0 && in_heap(self, entry, ENTRY_HEADER) && !(entry & 7)) {
        state = hword(self, entry + 8);
        areas_word = hword(self, entry + 16);
        uint64_t kind = (state & KIND_MASK) >> KIND_SHIFT;
        uint64_t value_at = entry + ENTRY_HEADER + key_room(hword(self, entry));
        uint64_t current_at = value_at + (state & HIGH_BIT ? areas_word & LOW63 : 0);
        if ((kind == KIND_INT64 || kind == KIND_FLOAT64) && (state & LENGTH_MASK) == 8 &&
            in_heap(self, current_at, 8)) {
            uint64_t current;
            memcpy(&current, self->hbuf + current_at, 8);
            ok = 1;
            if (kind == KIND_INT64 && !amount_float) {
                long long value = (long long)current;
                if (__builtin_add_overflow(value, int_amount, &int_result)) ok = 0;
                new_kind = KIND_INT64;
                raw = (uint64_t)int_result;
            } else {
                double value;
                if (kind == KIND_INT64)
                    value = (double)(long long)current;
                else
                    memcpy(&value, &current, 8);
                float_result = value + (amount_float ? float_amount : (double)int_amount);
                new_kind = KIND_FLOAT64;
                memcpy(&raw, &float_result, 8);
            }
            if (areas_word & HIGH_BIT) { /* two areas: the spare one, then the flip */
                start = value_at + (state & HIGH_BIT ? 0 : areas_word & LOW63);
                if (!in_heap(self, start, 8)) ok = 0;
            } else if (new_kind != kind) {
                ok = 0; /* a one-area entry cannot change kind with one store */
            } else {
                start = current_at;
            }
        }
    }
    if (!ok) {
        if (core_unlock(self)) return NULL;
        RETURN_NONE;
    }
    uint64_t version = core_begin(self);
    if (areas_word & HIGH_BIT) {
        memcpy(self->hbuf + start, &raw, 8);
        set_hword(self, entry + 8, (~state & HIGH_BIT) | new_kind << KIND_SHIFT | 8);
    } else {
        set_hword(self, start, raw); /* one aligned 8-byte store */
    }
    core_end(self);
    if (core_unlock(self)) return NULL;
    PyObject *result = new_kind == KIND_INT64 ? PyLong_FromLongLong(int_result)
                                              : PyFloat_FromDouble(float_result);
    if (!result) return NULL;
    return tuple_of(2, U64(version), result, NULL);
}

/* remove(encoded, key_hash, want_value) -> (new version, kind, value bytes or None), False
 * when the key is absent (nothing changed), or None when the Python path must do it. One
 * mutation: begin, Table.unpublish (the slot, the counts, the heap's free), end. */
static PyObject *Core_remove(Core *self, PyObject *const *args, Py_ssize_t nargs) {
    const char *encoded;
    Py_ssize_t length;
    uint64_t key_hash;
    probe_t found;
    if (check_nargs("remove", nargs, 3) || arg_bytes(args[0], &encoded, &length) ||
        arg_u64(args[1], &key_hash) || core_bound(self) || core_identity(self))
        return NULL;
    int want_value = PyObject_IsTrue(args[2]);
    if (want_value < 0) return NULL;
    int locked = core_lock(self);
    if (locked == FAILED) return NULL;
    if (locked == UNUSUAL) RETURN_NONE;
    heap_t heap = core_heap(self);
    int status = probe(self, encoded, (uint64_t)length, key_hash, 1, &found);
    if (!status && found.index < 0) {
        if (core_unlock(self)) return NULL;
        RETURN_FALSE;
    }
    uint64_t entry = status ? 0 : found.word & OFFSET_MASK, kind = 0;
    PyObject *value = NULL;
    if (!status && (heap_free_check(&heap, entry) != FREE_OK || !in_heap(self, entry, ENTRY_HEADER)))
        status = ST_BAD_FREE;
    if (!status && want_value) { /* Table.load_value's bytes, copied before the entry goes */
        uint64_t state = hword(self, entry + 8);
        uint64_t at = entry + ENTRY_HEADER + key_room(hword(self, entry));
        if (state & HIGH_BIT) at += hword(self, entry + 16) & LOW63;
        uint64_t size = state & LENGTH_MASK;
        kind = (state & KIND_MASK) >> KIND_SHIFT;
        if (!in_heap(self, at, size)) {
            status = ST_CORRUPT;
        } else {
            value = PyBytes_FromStringAndSize((const char *)self->hbuf + at, (Py_ssize_t)size);
            if (!value) {
                pthread_mutex_unlock(self->mutex);
                return NULL;
            }
        }
    }
    if (status) {
        Py_XDECREF(value);
        if (core_unlock(self)) return NULL;
        RETURN_NONE;
    }
    uint64_t version = core_begin(self);
    unpublish(self, &heap, (uint64_t)found.index, found.word);
    core_end(self);
    if (core_unlock(self)) {
        Py_XDECREF(value);
        return NULL;
    }
    if (!value) {
        Py_INCREF(Py_None);
        value = Py_None;
    }
    return tuple_of(3, U64(version), U64(kind), value);
}

static PyMethodDef Core_methods[] = {
    {"bind_lock", FASTCALL(Core_bind_lock), METH_FASTCALL, NULL},
    {"probe", FASTCALL(Core_probe), METH_FASTCALL, NULL},
    {"entry_value", FASTCALL(Core_entry_value), METH_FASTCALL, NULL},
    {"put", FASTCALL(Core_put), METH_FASTCALL, NULL},
    {"set_number", FASTCALL(Core_set_number), METH_FASTCALL, NULL},
    {"unpublish", FASTCALL(Core_unpublish), METH_FASTCALL, NULL},
    {"get", FASTCALL(Core_get), METH_FASTCALL, NULL},
    {"store", FASTCALL(Core_store), METH_FASTCALL, NULL},
    {"increment", FASTCALL(Core_increment), METH_FASTCALL, NULL},
    {"remove", FASTCALL(Core_remove), METH_FASTCALL, NULL},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot Core_slots[] = {
    {Py_tp_init, (void *)Core_init},
    {Py_tp_dealloc, (void *)Core_dealloc},
    {Py_tp_methods, Core_methods},
    {Py_tp_new, (void *)PyType_GenericNew},
    {Py_tp_doc, "One mapped data block of a dict: its table and heap, and its dict's lock."},
    {0, NULL},
};

static PyType_Spec Core_spec = {
    "shared_memory_array._native.Core", sizeof(Core), 0, Py_TPFLAGS_DEFAULT, Core_slots,
};

/* -- robust mutexes and futexes (_platform/_linux.py) ---------------------------------------- */

static PyObject *py_mutex_init(PyObject *Py_UNUSED(module), PyObject *address_object) {
    void *address;
    pthread_mutexattr_t attr;
    if (arg_ptr(address_object, &address)) return NULL;
    pthread_mutexattr_init(&attr);
    pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
    pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
    int error = pthread_mutex_init((pthread_mutex_t *)address, &attr);
    pthread_mutexattr_destroy(&attr);
    if (error) return os_error(error, strerror(error));
    RETURN_NONE;
}

/* mutex_lock(address) -> True if its holder died holding it (the caller repairs). */
static PyObject *py_mutex_lock(PyObject *Py_UNUSED(module), PyObject *address_object) {
    pthread_mutex_t *mutex;
    if (arg_ptr(address_object, (void **)&mutex)) return NULL;
    int error = lock_mutex(mutex);
    if (error == EOWNERDEAD) RETURN_TRUE;
    if (error) return mutex_error(error, "lock");
    RETURN_FALSE;
}

static PyObject *py_mutex_consistent(PyObject *Py_UNUSED(module), PyObject *address_object) {
    pthread_mutex_t *mutex;
    if (arg_ptr(address_object, (void **)&mutex)) return NULL;
    pthread_mutex_consistent(mutex);
    RETURN_NONE;
}

static PyObject *py_mutex_unlock(PyObject *Py_UNUSED(module), PyObject *address_object) {
    pthread_mutex_t *mutex;
    if (arg_ptr(address_object, (void **)&mutex)) return NULL;
    int error = pthread_mutex_unlock(mutex);
    if (error) return mutex_error(error, "unlock");
    RETURN_NONE;
}

/* futex_wait(address, expected, timeout) sleeps while the 32-bit word is ``expected`` (GIL
 * released); returns early on a wake-up, a signal or the timeout (the caller looks again). */
static PyObject *py_futex_wait(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs) {
    void *address;
    uint64_t expected;
    struct timespec spec, *timeout = NULL;
    if (check_nargs("futex_wait", nargs, 3) || arg_ptr(args[0], &address) ||
        arg_u64(args[1], &expected))
        return NULL;
    if (args[2] != Py_None) {
        double seconds = PyFloat_AsDouble(args[2]);
        if (seconds == -1.0 && PyErr_Occurred()) return NULL;
        if (seconds < 0) seconds = 0;
        if (seconds > 1e9) seconds = 1e9;
        spec.tv_sec = (time_t)seconds;
        spec.tv_nsec = (long)((seconds - (double)spec.tv_sec) * 1e9);
        timeout = &spec;
    }
    long result;
    int error;
    Py_BEGIN_ALLOW_THREADS
    result = syscall(SYS_futex, address, FUTEX_WAIT, (uint32_t)expected, timeout, NULL, 0);
    error = errno;
    Py_END_ALLOW_THREADS
    if (result < 0 && error == EINTR && PyErr_CheckSignals()) return NULL;
    RETURN_NONE;
}

static PyObject *py_futex_wake(PyObject *Py_UNUSED(module), PyObject *address_object) {
    void *address;
    if (arg_ptr(address_object, &address)) return NULL;
    syscall(SYS_futex, address, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
    RETURN_NONE;
}

/* futex_add(address, delta) -> True: an atomic add to the 32-bit word, then a wake-up of
 * every sleeper (what the Python twin's FUTEX_WAKE_OP does in one call). */
static PyObject *py_futex_add(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs) {
    void *address;
    long delta;
    if (check_nargs("futex_add", nargs, 2) || arg_ptr(args[0], &address)) return NULL;
    delta = PyLong_AsLong(args[1]);
    if (delta == -1 && PyErr_Occurred()) return NULL;
    __atomic_add_fetch((uint32_t *)address, (uint32_t)delta, __ATOMIC_SEQ_CST);
    syscall(SYS_futex, address, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
    RETURN_TRUE;
}

/* -- attaching (_block.py SharedBlock.open, _platform/_linux.py) ----------------------------- */

static PyObject *stat_fields(const struct stat *info) {
    /* os.stat_result's 19 fields on Linux: the 10 of the sequence, then the float times, the
     * times in ns, st_blksize, st_blocks, st_rdev. */
    long long ns[3] = {
        (long long)info->st_atim.tv_sec * 1000000000LL + info->st_atim.tv_nsec,
        (long long)info->st_mtim.tv_sec * 1000000000LL + info->st_mtim.tv_nsec,
        (long long)info->st_ctim.tv_sec * 1000000000LL + info->st_ctim.tv_nsec,
    };
    return Py_BuildValue(
        "(KKKKKKLLLLdddLLLLLK)", (unsigned long long)info->st_mode,
        (unsigned long long)info->st_ino, (unsigned long long)info->st_dev,
        (unsigned long long)info->st_nlink, (unsigned long long)info->st_uid,
        (unsigned long long)info->st_gid, (long long)info->st_size,
        (long long)info->st_atim.tv_sec, (long long)info->st_mtim.tv_sec,
        (long long)info->st_ctim.tv_sec, (double)ns[0] * 1e-9, (double)ns[1] * 1e-9,
        (double)ns[2] * 1e-9, ns[0], ns[1], ns[2], (long long)info->st_blksize,
        (long long)info->st_blocks, (unsigned long long)info->st_rdev);
}

/* open_held(path, writable, header_bytes) -> (fd, stat fields, header), or a number when the
 * Python path must open it (it then says why): -errno where open or fstat failed, 1 for an
 * entry that is no regular file of this user's, writable by group or others, or held
 * exclusively right now (nothing is left open then).
 * The steps of SharedBlock.open, in its order: open with O_NOFOLLOW | O_NONBLOCK |
 * O_CLOEXEC, fstat, the trust check, the shared OFD lock on byte 0 (HOLD, without waiting);
 * then a pread of the first ``header_bytes`` (SharedBlock.header_bytes). */
static PyObject *py_open_held(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs) {
    if (check_nargs("open_held", nargs, 3)) return NULL;
    const char *path = PyUnicode_AsUTF8AndSize(args[0], NULL);
    if (!path) return NULL;
    int writable = PyObject_IsTrue(args[1]);
    Py_ssize_t want = PyLong_AsSsize_t(args[2]);
    if (writable < 0 || (want == -1 && PyErr_Occurred())) return NULL;
    int fd = open(path, (writable ? O_RDWR : O_RDONLY) | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) return PyLong_FromLong(-errno);
    struct stat info;
    if (fstat(fd, &info) < 0) {
        int error = errno;
        close(fd);
        return PyLong_FromLong(-error);
    }
    struct flock lock = {.l_type = F_RDLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 1};
    if (!S_ISREG(info.st_mode) || info.st_uid != geteuid() || info.st_mode & (S_IWGRP | S_IWOTH) ||
        fcntl(fd, F_OFD_SETLK, &lock) != 0) {
        close(fd);
        return PyLong_FromLong(1);
    }
    Py_ssize_t size = info.st_size < want ? (Py_ssize_t)info.st_size : want;
    char *raw = PyMem_Malloc(size > 0 ? (size_t)size : 1);
    if (!raw) {
        close(fd);
        return PyErr_NoMemory();
    }
    ssize_t got = size > 0 ? pread(fd, raw, (size_t)size, 0) : 0;
    int error = errno;
    PyObject *header = got >= 0 ? PyBytes_FromStringAndSize(raw, got) : NULL;
    PyMem_Free(raw);
    if (got < 0) {
        close(fd);
        return PyLong_FromLong(-error);
    }
    PyObject *result = tuple_of(3, PyLong_FromLong(fd), stat_fields(&info), header);
    if (!result) close(fd);
    return result;
}

/* kill_after_stores(n): tests only, see kill_countdown (0 turns it off). */
static PyObject *py_kill_after_stores(PyObject *Py_UNUSED(module), PyObject *count) {
    long value = PyLong_AsLong(count);
    if (value == -1 && PyErr_Occurred()) return NULL;
    kill_countdown = value;
    RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"kill_after_stores", py_kill_after_stores, METH_O, NULL},
    {"heap_alloc", FASTCALL(py_heap_alloc), METH_FASTCALL, NULL},
    {"heap_free", FASTCALL(py_heap_free), METH_FASTCALL, NULL},
    {"heap_extend", FASTCALL(py_heap_extend), METH_FASTCALL, NULL},
    {"mutex_init", py_mutex_init, METH_O, NULL},
    {"mutex_lock", py_mutex_lock, METH_O, NULL},
    {"mutex_consistent", py_mutex_consistent, METH_O, NULL},
    {"mutex_unlock", py_mutex_unlock, METH_O, NULL},
    {"futex_wait", FASTCALL(py_futex_wait), METH_FASTCALL, NULL},
    {"futex_wake", py_futex_wake, METH_O, NULL},
    {"futex_add", FASTCALL(py_futex_add), METH_FASTCALL, NULL},
    {"open_held", FASTCALL(py_open_held), METH_FASTCALL, NULL},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "shared_memory_array._native",
    "The optional accelerator of shared_memory_array (see _accel.py).", -1, module_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native(void) {
    crc_init();
    if (pthread_atfork(NULL, NULL, after_fork_in_child) != 0) {
        PyErr_SetString(PyExc_ImportError, "pthread_atfork failed");
        return NULL;
    }
    PyObject *module = PyModule_Create(&module_def);
    if (!module) return NULL;
    PyObject *core = PyType_FromSpec(&Core_spec);
    if (!core || PyModule_AddObject(module, "Core", core) < 0) {
        Py_XDECREF(core);
        Py_DECREF(module);
        return NULL;
    }
    if (PyModule_AddIntConstant(module, "STATUS_TABLE_FULL", ST_TABLE_FULL) ||
        PyModule_AddIntConstant(module, "STATUS_HEAP_FULL", ST_HEAP_FULL) ||
        PyModule_AddIntConstant(module, "STATUS_NO_EMPTY_SLOT", ST_NO_EMPTY_SLOT) ||
        PyModule_AddIntConstant(module, "STATUS_CORRUPT", ST_CORRUPT) ||
        PyModule_AddIntConstant(module, "PTHREAD_MUTEX_BYTES", (long)sizeof(pthread_mutex_t))) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
