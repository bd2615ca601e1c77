/*
 * capbus shared-memory layout: the ONE definition of every size and offset. module.c exports each
 * of these as a module attribute; Python code reads them from capbus._core and never redefines
 * them. All multi-byte fields are little-endian (native; the build refuses big-endian hosts).
 */
#ifndef CAPBUS_NATIVE_LAYOUT_H
#define CAPBUS_NATIVE_LAYOUT_H

#include <stddef.h>
#include <stdint.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "capbus shared memory is little-endian; big-endian hosts are not supported"
#endif

#define PAGE_SIZE_ 4096u

/* ---- Control page (one per channel; written only by the kernel, PROT_READ for both ends). ---- */
#define CTRL_SIZE 4096u
#define CTRL_STATE_OFF 0u              /* u32: STATE_* (anything else is treated as CLOSED) */
#define CTRL_GENERATION_OFF 4u         /* u32 */
#define CTRL_EXPIRY_OFF 8u             /* u64: CLOCK_MONOTONIC absolute ns, 0 = none */
#define CTRL_MAX_MESSAGE_SIZE_OFF 16u  /* u64: 0 = none */
#define CTRL_RATE_LIMIT_OFF 24u        /* u64 */
#define CTRL_BANDWIDTH_OFF 32u         /* u64 */
#define CTRL_RIGHTS_OFF 40u            /* u32: RIGHT_* bits of the client's capability */
#define CTRL_FLAGS_OFF 44u             /* u32: CTRL_F_* */
#define CTRL_SENDER_ID_OFF 64u         /* u64: kernel-verified ProcessId of the client side */
/* The capability's token buckets (rate and bandwidth belong to the capability, not the channel):
 * CTRL_CAP_ID_OFF names the bucket of CTRL_RATE_LIMIT_OFF/CTRL_BANDWIDTH_OFF, and the chain lists
 * the capability's limited ancestors, each charged for every message too. Ids are the kernel's,
 * unique while it runs; 0 = a bucket of the channel's own. Written before the page is handed out
 * and never changed: the receiver reads them once, when it adds the channel. */
#define CTRL_CAP_ID_OFF 72u            /* u64: id of the leaf's bucket, 0 = the channel's own */
#define CTRL_CHAIN_LEN_OFF 80u         /* u32: entries at CTRL_CHAIN_OFF (<= CTRL_CHAIN_MAX) */
/* u32: the highest priority (PRIO_* below) a caller on this channel may ask for, plus
 * PRIO_CTRL_BIAS; 0 = no limit beyond the service's own range. The receiver reads it per call
 * (it clamps the slot's FLAG_PRIO_MASK with it: the caller's own word is never trusted). */
#define CTRL_MAX_PRIORITY_OFF 84u
#define CTRL_CHAIN_OFF 128u            /* CTRL_CHAIN_MAX x {u64 id, u64 rate, u64 bandwidth} */
#define CTRL_CHAIN_ENTRY_SIZE 24u
#define CTRL_CHAIN_MAX 4u              /* limited ancestors (with limits of their own) at most */
_Static_assert(CTRL_CHAIN_OFF + CTRL_CHAIN_MAX * CTRL_CHAIN_ENTRY_SIZE <= CTRL_SIZE,
               "the bucket chain fits the control page");

/* CTRL_FLAGS_OFF bits. CTRL_F_ENFORCE: check rights, expiry, size, rate and bandwidth for every
 * message (both ends). The kernel sets it only when the capability carries a limit or lacks
 * RIGHT_SEND, so a channel without limits pays one predictable branch. The kernel writes the
 * limit fields first and CTRL_FLAGS_OFF last (both ends load the flags with ACQUIRE). */
#define CTRL_F_ENFORCE 1u

/* Capability rights (CTRL_RIGHTS_OFF). Only RIGHT_SEND is enforced by the data plane. */
#define RIGHT_SEND 1u
#define RIGHT_RECEIVE 2u
#define RIGHT_SHARE 4u
#define RIGHT_MAP 8u
#define RIGHT_READ 16u
#define RIGHT_WRITE 32u

#define STATE_OPEN 1u
#define STATE_REVOKED 2u
#define STATE_PEER_DEAD 3u
#define STATE_CLOSED 4u

/* ---- Service doorbell (one per service; RW for the server and every client: untrusted). ---- */
#define DOORBELL_SIZE 4096u
#define DB_SEQ_OFF 0u              /* u32 futex word: clients add 1 after publishing */
#define DB_SERVER_SLEEPING_OFF 64u /* u32: server asleep: 1 on seq, 2 on its eventfd */
#define DB_EVENT_WANTED_OFF 68u    /* u32: 1 while an event-loop server waits on its eventfd */
#define DB_SERVER_SPINS_OFF 72u    /* u32: 1 while the server never sleeps nor waits on its
                                      eventfd (spin mode): clients then only set their hint bit */
#define DB_BITMAP_OFF 128u         /* MAX_CHANNELS bits as u64 words: "channel i has work" hints */
#define MAX_CHANNELS 4096u
#define DB_BITMAP_WORDS (MAX_CHANNELS / 64u)

/* ---- Channel memfd ("lane"): header page, request ring, response ring, two arenas. ---- */
#define CHAN_HEADER_SIZE 4096u
#define CHAN_MAGIC_OFF 0u        /* u64 "CAPBUSC1" -- informational, never trusted */
#define CHAN_VERSION_OFF 8u      /* u32 -- informational */
#define CHAN_NSLOTS_OFF 12u      /* u32 -- informational */
#define CHAN_ARENA_SIZE_OFF 16u  /* u64 -- informational */
#define CHAN_CANCEL_BELOW_OFF 64u /* u64, written by the client: requests with tag < this are dead */
#define CHAN_REFUSED_OFF 128u    /* u64, written by the client: messages refused (ring/arena full);
                                    untrusted, informational */
#define CHAN_MAGIC 0x3143535542504143ull /* the bytes "CAPBUSC1" read as a little-endian u64 */
#define CHAN_VERSION 1u

/* ---- Metrics counters in the channel header page (u64 each; informational, never trusted). --
 * Two blocks, each on cache lines of its own, away from the fields the data plane reads per
 * message (cancel_below, refused). Each block has ONE writer, which keeps the authoritative values
 * in private memory and stores them here with RELAXED atomic stores (readers -- the kernel, capbus
 * top -- see each u64 untorn; a hostile peer may scribble the block, which only misleads readers
 * until the next store). Offsets below are within the block. */
#define CHAN_CSTATS_OFF 1024u /* client block: written only by the Lane */
#define CSTATS_SENT_OFF 0u            /* messages sent (calls and one-way) */
#define CSTATS_BYTES_SENT_OFF 8u      /* payload bytes sent */
#define CSTATS_CALLS_OFF 16u          /* calls sent (call, call_start, call_loan) */
#define CSTATS_TIMEOUTS_OFF 24u       /* calls that raised Timeout */
#define CSTATS_REFUSED_RATE_OFF 32u   /* refused by the lane's rate/bandwidth buckets */
#define CSTATS_REFUSED_SIZE_OFF 40u   /* MessageTooLarge raised by the lane */
#define CSTATS_REFUSED_PERM_OFF 48u   /* PermissionDenied / expired raised by the lane */
#define CSTATS_LATENCY_MAX_OFF 56u    /* largest call round trip, ns */
#define CSTATS_LATENCY_SUM_OFF 64u    /* sum of call round trips, ns */
#define CSTATS_LATENCY_COUNT_OFF 72u  /* call round trips measured (= sum of hist) */
#define STATS_SEC_INDEX_OFF 80u       /* both blocks: CLOCK_MONOTONIC whole second of the bucket */
#define STATS_SEC_COUNT_OFF 88u       /* both blocks: messages in that second so far */
#define STATS_PREV_COUNT_OFF 96u      /* both blocks: messages in the whole second before it */
#define CSTATS_SEC_INDEX_OFF STATS_SEC_INDEX_OFF
#define CSTATS_SEC_COUNT_OFF STATS_SEC_COUNT_OFF
#define CSTATS_PREV_COUNT_OFF STATS_PREV_COUNT_OFF
#define CSTATS_HIST_OFF 128u          /* STATS_HIST_BUCKETS u64: call round-trip histogram */
#define STATS_HIST_BUCKETS 28u        /* bucket i: [BASE * 2^i, BASE * 2^(i+1)) ns; bucket 0 also */
#define STATS_HIST_BASE_NS 100u       /* takes < BASE, the last one everything above */
#define CSTATS_SIZE (CSTATS_HIST_OFF + 8u * STATS_HIST_BUCKETS)

#define CHAN_SSTATS_OFF 2048u /* server block: written only by the ServerSet */
#define SSTATS_RECEIVED_OFF 0u        /* requests delivered (recv/poll/recv_many) */
#define SSTATS_BYTES_RECEIVED_OFF 8u  /* their payload bytes */
#define SSTATS_REPLIES_OFF 16u        /* replies written (Request.reply/reply_error, reply()) */
#define SSTATS_REPLY_FAILED_OFF 24u   /* replies to a client that is gone */
#define SSTATS_DROPS_RATE_OFF 32u     /* refused by the capability's limits, per reason */
#define SSTATS_DROPS_BANDWIDTH_OFF 40u
#define SSTATS_DROPS_SIZE_OFF 48u
#define SSTATS_DROPS_EXPIRED_OFF 56u
#define SSTATS_DROPS_RIGHTS_OFF 64u
#define SSTATS_CANCELLED_OFF 72u      /* calls skipped because their caller cancelled them */
#define SSTATS_SEC_INDEX_OFF STATS_SEC_INDEX_OFF
#define SSTATS_SEC_COUNT_OFF STATS_SEC_COUNT_OFF
#define SSTATS_PREV_COUNT_OFF STATS_PREV_COUNT_OFF
#define SSTATS_SIZE 128u

_Static_assert(CHAN_CSTATS_OFF % 64 == 0 && CHAN_SSTATS_OFF % 64 == 0, "stats blocks aligned");
_Static_assert(CHAN_REFUSED_OFF + 8 <= CHAN_CSTATS_OFF, "client stats after the refused counter");
_Static_assert(CHAN_CSTATS_OFF + CSTATS_SIZE <= CHAN_SSTATS_OFF, "client stats block fits");
_Static_assert(CHAN_SSTATS_OFF + SSTATS_SIZE <= CHAN_HEADER_SIZE, "server stats block fits");

/* Ring (request ring: client -> server; response ring: server -> client). */
#define RING_TAIL_OFF 0u               /* u64, written by the producer */
#define RING_HEAD_OFF 64u              /* u64, written by the consumer */
#define RING_CONSUMER_SLEEPING_OFF 72u /* u32, resp ring: client asleep: 1 on tail, 2 on its pipe */
#define RING_CONSUMER_EVENT_OFF 76u    /* u32, response ring only: client waits on its eventfd */
/* u32, request ring only, written by the client: a producer waits for room (ring slots or arena
 * bytes) on its reply eventfd; the server writes that eventfd whenever it frees some. In the
 * consumer's cache line on purpose: the server has just written head there when it looks. */
#define RING_PRODUCER_WAITING_OFF 80u
#define RING_ARENA_RELEASED_OFF 128u   /* u64, written by the consumer: arena bytes released */
#define RING_SLOTS_OFF 256u
#define REQ_RING_OFF CHAN_HEADER_SIZE

#define DEFAULT_NSLOTS 256u
#define MIN_NSLOTS 1u
#define MAX_NSLOTS 65536u
#define DEFAULT_ARENA_SIZE (128ull << 20)
#define MIN_ARENA_SIZE 4096ull
#define MAX_ARENA_SIZE (1ull << 32) /* slot payload_off/payload_len are u32 */

/* ---- Slot: the 48-byte SmallMessage, then tag and the arena chunk reference. ---- */
typedef struct {
    uint64_t capability; /* @0 */
    uint32_t opcode;     /* @8 */
    uint32_t flags;      /* @12 */
    uint64_t data[4];    /* @16 */
    uint64_t tag;        /* @48: transaction id; a reply carries its request's tag */
    uint32_t payload_len; /* @56: bytes in the arena chunk (0 = no payload) */
    uint32_t payload_off; /* @60: arena offset of the chunk */
} slot_t;

#define SLOT_SIZE 64u
#define SMALL_MESSAGE_SIZE 48u
_Static_assert(sizeof(slot_t) == SLOT_SIZE, "slot size");
_Static_assert(offsetof(slot_t, opcode) == 8 && offsetof(slot_t, flags) == 12 &&
                   offsetof(slot_t, data) == 16 && offsetof(slot_t, tag) == 48 &&
                   offsetof(slot_t, payload_len) == 56 && offsetof(slot_t, payload_off) == 60,
               "slot layout");

/* Slot flags. Anything outside FLAG_KNOWN_MASK from a peer means corruption. */
#define FLAG_LARGE 0x1u          /* payload > LM_INLINE_SIZE: it follows the LargeMessage struct */
#define FLAG_CHECKSUM 0x2u       /* header.checksum is the CRC-32 of the payload; verify it */
#define FLAG_REPLY_EXPECTED 0x4u /* a call (the server must reply) rather than a one-way send */
#define FLAG_ERROR 0x8u          /* a reply carrying an error code in data[0] */
#define FLAG_LOANED 0x10u        /* the payload was written in place (Lane.loan): receive it zero-copy */
/* With FLAG_ERROR: data[0] is a capbus error code (IpcError.code), from capbus itself (a limit
 * refusal, NoReply, an IpcError a serve() handler raised). Without it, data[0] is the
 * application's own code (Request.reply_error): the caller raises RemoteError, never a capbus
 * error that merely shares the number. */
#define FLAG_IPC_ERROR 0x20u
/* Priority propagation (requests only; see prio.c): FLAG_PRIO says the caller's runtime stamped
 * its thread's priority into FLAG_PRIO_MASK as (priority + PRIO_SLOT_BIAS), FLAG_PRIO_RR that the
 * thread was SCHED_RR (else SCHED_FIFO) when the priority is a real-time one. A priority is
 * -nice for SCHED_OTHER/BATCH/IDLE (PRIO_MIN = nice 19 .. 20 = nice -20) and 20 + the real-time
 * priority for SCHED_FIFO/RR (21 .. PRIO_MAX). The stamped value is the caller's word only: the
 * receiver clamps it to the capability's CTRL_MAX_PRIORITY_OFF and the service's own range. */
#define FLAG_PRIO 0x40u
#define FLAG_PRIO_RR 0x80u
#define FLAG_PRIO_MASK 0xFF00u
#define FLAG_PRIO_SHIFT 8u
#define PRIO_SLOT_BIAS 19
#define PRIO_MIN (-19)
#define PRIO_MAX 119
#define PRIO_RT_BASE 20 /* priority 20 + r is SCHED_FIFO/RR priority r */
#define PRIO_CTRL_BIAS 20
#define FLAG_USER_MASK 0xFFFF0000u /* passed through untouched for the protocol layer above */
#define FLAG_KNOWN_MASK                                                                            \
    (FLAG_LARGE | FLAG_CHECKSUM | FLAG_REPLY_EXPECTED | FLAG_ERROR | FLAG_LOANED | FLAG_IPC_ERROR |  \
     FLAG_PRIO | FLAG_PRIO_RR | FLAG_PRIO_MASK | FLAG_USER_MASK)

/* A request payload of at least this many bytes (or any FLAG_LOANED one) is delivered zero-copy:
 * Request.payload is a read-only view of the arena, held until reply/release. */
#define ZC_THRESHOLD (64u << 10)

/* ---- Arena chunk: the LargeMessage struct, padded to 128 bytes, then (if large) the payload. */
typedef struct {
    uint64_t capability;
    uint32_t opcode;
    uint32_t flags;
    uint64_t total_size; /* payload length */
    uint32_t checksum;   /* CRC-32 (IEEE, = zlib.crc32) of the payload if FLAG_CHECKSUM, else 0 */
    uint32_t pad;        /* 0 */
} msg_header_t;

typedef struct {
    uint64_t base_addr;    /* large: arena offset of the payload bytes (chunk offset + 128) */
    uint64_t size;         /* large: payload length; inline: 0 */
    uint32_t permissions;  /* large: REGION_PERM_READ; inline: 0 */
    uint32_t cache_policy; /* 0 */
} mem_region_t;

typedef struct {
    msg_header_t header;    /* @0, 32 bytes */
    mem_region_t region;    /* @32, 24 bytes */
    uint8_t inline_data[64]; /* @56: payloads of <= 64 bytes */
    uint8_t pad[8];         /* to 128 */
} large_msg_t;

#define LARGE_MSG_SIZE 128u
#define LM_CAPABILITY_OFF 0u
#define LM_OPCODE_OFF 8u
#define LM_FLAGS_OFF 12u
#define LM_TOTAL_SIZE_OFF 16u
#define LM_CHECKSUM_OFF 24u
#define LM_PAD_OFF 28u
#define LM_REGION_BASE_OFF 32u
#define LM_REGION_SIZE_OFF 40u
#define LM_REGION_PERMISSIONS_OFF 48u
#define LM_REGION_CACHE_POLICY_OFF 52u
#define LM_INLINE_OFF 56u
#define LM_INLINE_SIZE 64u
#define REGION_PERM_READ 1u
#define CHUNK_ALIGN 64u

_Static_assert(sizeof(msg_header_t) == 32, "MessageHeader size");
_Static_assert(sizeof(mem_region_t) == 24, "MemoryRegion size");
_Static_assert(sizeof(large_msg_t) == LARGE_MSG_SIZE, "LargeMessage size");
_Static_assert(offsetof(large_msg_t, region) == LM_REGION_BASE_OFF, "region offset");
_Static_assert(offsetof(large_msg_t, inline_data) == LM_INLINE_OFF, "inline offset");
_Static_assert(offsetof(msg_header_t, checksum) == LM_CHECKSUM_OFF, "checksum offset");

/* ---- Derived sizes (all in u64; callers validate nslots/arena_size first). ---- */
static inline uint64_t round_up_u64(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }
static inline uint64_t ring_size(uint64_t nslots) { return RING_SLOTS_OFF + nslots * SLOT_SIZE; }
static inline uint64_t resp_ring_off(uint64_t nslots) { return REQ_RING_OFF + ring_size(nslots); }
static inline uint64_t req_arena_off(uint64_t nslots)
{
    return round_up_u64(REQ_RING_OFF + 2 * ring_size(nslots), PAGE_SIZE_);
}
static inline uint64_t resp_arena_off(uint64_t nslots, uint64_t asize)
{
    return req_arena_off(nslots) + asize;
}
static inline uint64_t channel_size(uint64_t nslots, uint64_t asize)
{
    return req_arena_off(nslots) + 2 * asize;
}
/* Bytes of arena a payload of `len` bytes occupies (the chunk), and the largest payload. */
static inline uint64_t chunk_len_for(uint64_t len)
{
    return LARGE_MSG_SIZE + (len > LM_INLINE_SIZE ? round_up_u64(len, CHUNK_ALIGN) : 0);
}
static inline uint64_t max_payload_for(uint64_t asize) { return asize - LARGE_MSG_SIZE; }

#endif
