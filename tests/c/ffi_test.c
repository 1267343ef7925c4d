/*
 * The C ABI from C: NULL arguments, invalid UTF-8, double frees, wrong
 * handle kinds, status names, timeouts, shutdown with a waiting subscriber,
 * conditional saves and the conflict's actual sequence number, transforms,
 * bulk calls, listing, store and write options, conditional bulk saves,
 * batches and versioned loads. Built and run by tests/ffi.rs:
 *
 *   ffi_test URL TABLE CHANNEL
 *
 * Prints "ok NAME" per check and exits non-zero at the first failure.
 */
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "trebuchet_postgres.h"

#define CHECK(cond)                                                                  \
  do {                                                                               \
    if (!(cond)) {                                                                   \
      fprintf(stderr, "%s:%d: check failed: %s (last error: %s)\n", __FILE__, __LINE__, \
              #cond, trebuchet_last_error());                                        \
      exit(1);                                                                       \
    }                                                                                \
  } while (0)

#define EXPECT(call, status) CHECK((call) == (status))

static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1000.0 + ts.tv_nsec / 1e6;
}

static void null_arguments(trebuchet_store *store) {
  trebuchet_store *none = NULL;
  EXPECT(trebuchet_store_open(NULL, NULL, NULL, &none), TREBUCHET_NULL_ARGUMENT);
  CHECK(none == NULL);
  CHECK(strstr(trebuchet_last_error(), "url") != NULL);
  EXPECT(trebuchet_store_open("postgresql://localhost/x", NULL, NULL, NULL), TREBUCHET_NULL_ARGUMENT);
  EXPECT(trebuchet_store_save(NULL, "a", (const uint8_t *)"x", 1, NULL), TREBUCHET_NULL_ARGUMENT);
  EXPECT(trebuchet_store_save(store, NULL, (const uint8_t *)"x", 1, NULL), TREBUCHET_NULL_ARGUMENT);
  EXPECT(trebuchet_store_save(store, "a", NULL, 3, NULL), TREBUCHET_NULL_ARGUMENT);
  EXPECT(trebuchet_store_load(store, "a", NULL), TREBUCHET_NULL_ARGUMENT);
  EXPECT(trebuchet_store_exists(store, "a", NULL), TREBUCHET_NULL_ARGUMENT);
  EXPECT(trebuchet_store_transform(store, "a", NULL, NULL, NULL), TREBUCHET_NULL_ARGUMENT);
  EXPECT(trebuchet_listener_subscribe(NULL, NULL, NULL), TREBUCHET_NULL_ARGUMENT);
  EXPECT(trebuchet_subscription_next(NULL, 0, NULL), TREBUCHET_NULL_ARGUMENT);
  /* Out-parameters stay untouched on error. */
  uint64_t sequence = 12345;
  EXPECT(trebuchet_store_sequence(store, NULL, &sequence), TREBUCHET_NULL_ARGUMENT);
  CHECK(sequence == 12345);
  /* Free functions accept NULL and a pointer to NULL. */
  trebuchet_store_free(NULL);
  trebuchet_store_free(&none);
  trebuchet_buffer_free(NULL);
  trebuchet_listener_free(NULL);
  trebuchet_subscription_free(NULL);
  /* A successful call clears the last error. */
  bool exists = true;
  EXPECT(trebuchet_store_exists(store, "nobody", &exists), TREBUCHET_OK);
  CHECK(!exists);
  CHECK(strcmp(trebuchet_last_error(), "") == 0);
  printf("ok null_arguments\n");
}

/* Any int has a name: a number this library does not know (from a newer
 * header, or a caller in another language) gets a fixed one. */
static void status_names(void) {
  CHECK(strcmp(trebuchet_status_name(TREBUCHET_OK), "TREBUCHET_OK") == 0);
  CHECK(strcmp(trebuchet_status_name(TREBUCHET_CONFLICT), "TREBUCHET_CONFLICT") == 0);
  CHECK(strcmp(trebuchet_status_name(TREBUCHET_OTHER), "TREBUCHET_OTHER") == 0);
  const int unknown[] = {4, 99, 107, 1000, -1, INT_MAX, INT_MIN};
  for (size_t i = 0; i < sizeof unknown / sizeof unknown[0]; i++) {
    const char *name = trebuchet_status_name(unknown[i]);
    CHECK(name != NULL && strcmp(name, "TREBUCHET_UNKNOWN_STATUS") == 0);
  }
  printf("ok status_names\n");
}

static void invalid_input(trebuchet_store *store) {
  const char bad[] = {'r', 'o', 'o', 'm', (char)0xff, (char)0xfe, 0};
  uint64_t sequence = 7;
  EXPECT(trebuchet_store_save(store, bad, (const uint8_t *)"x", 1, &sequence), TREBUCHET_INVALID_UTF8);
  CHECK(sequence == 7);
  CHECK(strstr(trebuchet_last_error(), "UTF-8") != NULL);
  trebuchet_buffer *buf = NULL;
  EXPECT(trebuchet_store_load(store, bad, &buf), TREBUCHET_INVALID_UTF8);
  CHECK(buf == NULL);
  EXPECT(trebuchet_store_save(store, "", (const uint8_t *)"x", 1, NULL), TREBUCHET_INVALID_ACTOR_ID);
  trebuchet_store *other = NULL;
  EXPECT(trebuchet_store_open("postgresql://localhost/x", "no such;table", NULL, &other),
         TREBUCHET_INVALID_CONFIG);
  CHECK(other == NULL);
  EXPECT(trebuchet_store_open("postgresql://user:s3cr3t-pw@localhost:99999/x", NULL, NULL, &other),
         TREBUCHET_INVALID_CONFIG);
  CHECK(strstr(trebuchet_last_error(), "s3cr3t-pw") == NULL);
  printf("ok invalid_input\n");
}

static void save_load_and_double_free(trebuchet_store *store) {
  uint64_t sequence = 0;
  EXPECT(trebuchet_store_save(store, "c-actor", (const uint8_t *)"one", 3, &sequence), TREBUCHET_OK);
  CHECK(sequence == 1);
  trebuchet_buffer *buf = NULL;
  uint64_t loaded_sequence = 0;
  EXPECT(trebuchet_store_load_versioned(store, "c-actor", &buf, &loaded_sequence), TREBUCHET_OK);
  CHECK(loaded_sequence == 1);
  const uint8_t *data = NULL;
  size_t len = 0;
  EXPECT(trebuchet_buffer_get(buf, &data, &len), TREBUCHET_OK);
  CHECK(len == 3 && memcmp(data, "one", 3) == 0);
  /* The free function takes the variable's address and clears it, so the
   * second call sees NULL and does nothing. */
  trebuchet_buffer_free(&buf);
  CHECK(buf == NULL);
  trebuchet_buffer_free(&buf);
  EXPECT(trebuchet_buffer_get(buf, &data, &len), TREBUCHET_NULL_ARGUMENT);

  EXPECT(trebuchet_store_load(store, "c-nobody", &buf), TREBUCHET_NOT_FOUND);
  CHECK(buf == NULL);
  EXPECT(trebuchet_store_sequence(store, "c-nobody", &sequence), TREBUCHET_NOT_FOUND);

  /* An empty state is a state. */
  EXPECT(trebuchet_store_save(store, "c-empty", NULL, 0, NULL), TREBUCHET_OK);
  EXPECT(trebuchet_store_load(store, "c-empty", &buf), TREBUCHET_OK);
  EXPECT(trebuchet_buffer_get(buf, &data, &len), TREBUCHET_OK);
  CHECK(len == 0 && data != NULL);
  trebuchet_buffer_free(&buf);

  bool deleted = false;
  EXPECT(trebuchet_store_delete(store, "c-empty", &deleted), TREBUCHET_OK);
  CHECK(deleted);
  EXPECT(trebuchet_store_delete(store, "c-empty", &deleted), TREBUCHET_OK);
  CHECK(!deleted);
  printf("ok save_load_and_double_free\n");
}

static void conditional_saves(trebuchet_store *store) {
  uint64_t sequence = 0;
  EXPECT(trebuchet_store_save_if(store, "c-cond", (const uint8_t *)"a", 1, TREBUCHET_EXPECT_ABSENT, &sequence),
         TREBUCHET_OK);
  CHECK(sequence == 1);
  EXPECT(trebuchet_store_save_if(store, "c-cond", (const uint8_t *)"b", 1, TREBUCHET_EXPECT_ABSENT, &sequence),
         TREBUCHET_CONFLICT);
  CHECK(sequence == 1);
  EXPECT(trebuchet_store_save_if(store, "c-cond", (const uint8_t *)"b", 1, 1, &sequence), TREBUCHET_OK);
  CHECK(sequence == 2);
  EXPECT(trebuchet_store_save_if(store, "c-cond", (const uint8_t *)"c", 1, 1, NULL), TREBUCHET_CONFLICT);
  EXPECT(trebuchet_store_sequence(store, "c-cond", &sequence), TREBUCHET_OK);
  CHECK(sequence == 2);
  EXPECT(trebuchet_store_save_if(store, "c-cond", (const uint8_t *)"d", 1, UINT64_MAX, &sequence),
         TREBUCHET_INVALID_ARGUMENT);
  CHECK(sequence == 2);
  printf("ok conditional_saves\n");
}

/* A conflict's actual sequence number comes as data, ready for a retry. */
static void conflict_data(trebuchet_store *store) {
  uint64_t sequence = 0, actual = 12345;
  EXPECT(trebuchet_store_save(store, "c-data", (const uint8_t *)"a", 1, NULL), TREBUCHET_OK);
  EXPECT(trebuchet_store_save(store, "c-data", (const uint8_t *)"b", 1, &sequence), TREBUCHET_OK);
  CHECK(sequence == 2);
  CHECK(!trebuchet_last_conflict_actual(&actual));
  CHECK(actual == 12345);
  EXPECT(trebuchet_store_save_if(store, "c-data", (const uint8_t *)"c", 1, 1, &sequence), TREBUCHET_CONFLICT);
  CHECK(strcmp(trebuchet_status_name(TREBUCHET_CONFLICT), "TREBUCHET_CONFLICT") == 0);
  CHECK(strstr(trebuchet_last_error(), "found sequence 2") != NULL);
  CHECK(trebuchet_last_conflict_actual(&actual));
  CHECK(actual == 2);
  EXPECT(trebuchet_store_save_if(store, "c-data", (const uint8_t *)"c", 1, actual, &sequence), TREBUCHET_OK);
  CHECK(sequence == 3);
  CHECK(!trebuchet_last_conflict_actual(NULL));
  /* An actor that does not exist: 0, which is TREBUCHET_EXPECT_ABSENT. */
  EXPECT(trebuchet_store_save_if(store, "c-data-none", (const uint8_t *)"x", 1, 4, NULL), TREBUCHET_CONFLICT);
  CHECK(trebuchet_last_conflict_actual(&actual));
  CHECK(actual == TREBUCHET_EXPECT_ABSENT);
  EXPECT(trebuchet_store_save_if(store, "c-data-none", (const uint8_t *)"x", 1, actual, NULL), TREBUCHET_OK);
  EXPECT(trebuchet_store_save_if(store, "c-data", (const uint8_t *)"d", 1, UINT64_MAX, NULL),
         TREBUCHET_INVALID_ARGUMENT);
  CHECK(!trebuchet_last_conflict_actual(&actual));
  printf("ok conflict_data\n");
}

static void time_to_live(trebuchet_store *store) {
  uint64_t sequence = 0;
  bool exists = true;
  EXPECT(trebuchet_store_save_with_ttl(store, "c-ttl", (const uint8_t *)"t", 1, 0, &sequence),
         TREBUCHET_INVALID_ARGUMENT);
  EXPECT(trebuchet_store_exists(store, "c-ttl", &exists), TREBUCHET_OK);
  CHECK(!exists);
  EXPECT(trebuchet_store_save_with_ttl(store, "c-ttl", (const uint8_t *)"t", 1, 60000, &sequence),
         TREBUCHET_OK);
  CHECK(sequence == 1);
  EXPECT(trebuchet_store_exists(store, "c-ttl", &exists), TREBUCHET_OK);
  CHECK(exists);
  printf("ok time_to_live\n");
}

/* Saves, loads and deletes three actors, one call each. */
static void bulk(trebuchet_store *store) {
  const char *ids[] = {"c-bulk-1", "c-bulk-2", "c-bulk-3"};
  const uint8_t *data[] = {(const uint8_t *)"a", NULL, (const uint8_t *)"ccc"};
  size_t lens[] = {1, 0, 3};
  uint64_t sequences[3] = {0, 0, 0};
  EXPECT(trebuchet_store_save_many(store, 3, ids, data, lens, sequences), TREBUCHET_OK);
  CHECK(sequences[0] == 1 && sequences[1] == 1 && sequences[2] == 1);
  const char *asked[] = {"c-bulk-3", "c-nobody"};
  trebuchet_buffer *buffers[2] = {NULL, NULL};
  EXPECT(trebuchet_store_load_many(store, 2, asked, buffers), TREBUCHET_OK);
  CHECK(buffers[0] != NULL && buffers[1] == NULL);
  const uint8_t *bytes = NULL;
  size_t len = 0;
  EXPECT(trebuchet_buffer_get(buffers[0], &bytes, &len), TREBUCHET_OK);
  CHECK(len == 3 && memcmp(bytes, "ccc", 3) == 0);
  trebuchet_buffer_free(&buffers[0]);
  trebuchet_buffer_free(&buffers[1]);
  bool deleted[3] = {false, false, false};
  EXPECT(trebuchet_store_delete_many(store, 3, ids, deleted), TREBUCHET_OK);
  CHECK(deleted[0] && deleted[1] && deleted[2]);
  const char *twice[] = {"c-bulk-1", "c-bulk-1"};
  EXPECT(trebuchet_store_save_many(store, 2, twice, data, lens, NULL), TREBUCHET_INVALID_ARGUMENT);
  bool exists = true;
  EXPECT(trebuchet_store_exists(store, "c-bulk-1", &exists), TREBUCHET_OK);
  CHECK(!exists);
  printf("ok bulk\n");
}

/* Walks the ids of "c-list-" in pages of 2, keeping each page's token past
 * the page it came from. */
static void listing(trebuchet_store *store) {
  const char *ids[] = {"c-list-1", "c-list-2", "c-list-3", "c-list-4", "c-list-5"};
  for (size_t i = 0; i < 5; i++) {
    EXPECT(trebuchet_store_save(store, ids[i], (const uint8_t *)"l", 1, NULL), TREBUCHET_OK);
  }
  char *token = NULL;
  size_t seen = 0, pages = 0;
  do {
    trebuchet_id_page *page = NULL;
    EXPECT(trebuchet_store_list_ids(store, "c-list-", token, 2, &page), TREBUCHET_OK);
    free(token);
    token = NULL;
    pages++;
    size_t count = 0;
    EXPECT(trebuchet_id_page_count(page, &count), TREBUCHET_OK);
    CHECK(count <= 2);
    for (size_t i = 0; i < count; i++) {
      const char *id = NULL;
      size_t len = 0;
      EXPECT(trebuchet_id_page_get(page, i, &id, &len), TREBUCHET_OK);
      CHECK(len == strlen(id) && strncmp(id, "c-list-", 7) == 0);
      seen++;
    }
    const char *id = NULL;
    EXPECT(trebuchet_id_page_get(page, count, &id, NULL), TREBUCHET_INVALID_ARGUMENT);
    CHECK(id == NULL);
    const char *next = NULL;
    EXPECT(trebuchet_id_page_next(page, &next), TREBUCHET_OK);
    if (next != NULL) {
      token = strdup(next);
      CHECK(token != NULL);
    }
    trebuchet_id_page_free(&page);
    CHECK(page == NULL);
  } while (token != NULL && pages < 10);
  CHECK(seen == 5 && pages == 3);
  uint64_t actors = 0;
  EXPECT(trebuchet_store_count_actors(store, "c-list-", &actors), TREBUCHET_OK);
  CHECK(actors == 5);
  trebuchet_id_page *page = NULL;
  EXPECT(trebuchet_store_list_ids(store, "c-list-", NULL, 0, &page), TREBUCHET_INVALID_ARGUMENT);
  CHECK(page == NULL);
  printf("ok listing\n");
}

struct counter {
  int calls;
  int fail;
};

static int32_t increment(void *user_data, const uint8_t *current, size_t current_len, bool exists,
                         trebuchet_output *next) {
  struct counter *counter = user_data;
  counter->calls++;
  if (counter->fail) return 7;
  uint8_t value = exists && current_len == 1 ? current[0] : 0;
  value++;
  return trebuchet_output_set(next, &value, 1) == TREBUCHET_OK ? 0 : 1;
}

static void transforms(trebuchet_store *store) {
  struct counter counter = {0, 0};
  uint64_t sequence = 0;
  EXPECT(trebuchet_store_transform(store, "c-counter", increment, &counter, &sequence), TREBUCHET_OK);
  EXPECT(trebuchet_store_transform(store, "c-counter", increment, &counter, &sequence), TREBUCHET_OK);
  CHECK(sequence == 2 && counter.calls == 2);
  counter.fail = 1;
  EXPECT(trebuchet_store_transform(store, "c-counter", increment, &counter, &sequence), TREBUCHET_CALLBACK_FAILED);
  CHECK(sequence == 2);
  trebuchet_buffer *buf = NULL;
  EXPECT(trebuchet_store_load(store, "c-counter", &buf), TREBUCHET_OK);
  const uint8_t *data = NULL;
  size_t len = 0;
  EXPECT(trebuchet_buffer_get(buf, &data, &len), TREBUCHET_OK);
  CHECK(len == 1 && data[0] == 2);
  trebuchet_buffer_free(&buf);
  printf("ok transforms\n");
}

static void wrong_handles(trebuchet_store *store, trebuchet_listener *listener) {
  EXPECT(trebuchet_store_save((trebuchet_store *)listener, "a", (const uint8_t *)"x", 1, NULL),
         TREBUCHET_WRONG_HANDLE);
  CHECK(strstr(trebuchet_last_error(), "trebuchet_store") != NULL);
  trebuchet_event event;
  EXPECT(trebuchet_subscription_next((trebuchet_subscription *)store, 0, &event), TREBUCHET_WRONG_HANDLE);
  trebuchet_subscription *sub = NULL;
  EXPECT(trebuchet_listener_subscribe((trebuchet_listener *)store, NULL, &sub), TREBUCHET_WRONG_HANDLE);
  CHECK(sub == NULL);
  /* A free function given another kind leaves it alone. */
  trebuchet_store *not_a_store = (trebuchet_store *)listener;
  trebuchet_store_free(&not_a_store);
  CHECK(not_a_store == (trebuchet_store *)listener);
  EXPECT(trebuchet_listener_subscribe(listener, NULL, &sub), TREBUCHET_OK);
  trebuchet_subscription_free(&sub);
  CHECK(sub == NULL);
  printf("ok wrong_handles\n");
}

static void timeouts_and_changes(trebuchet_store *store, trebuchet_listener *listener) {
  trebuchet_subscription *sub = NULL;
  EXPECT(trebuchet_listener_subscribe(listener, "c-watched", &sub), TREBUCHET_OK);
  trebuchet_event event;
  event.sequence = 99;
  double start = now_ms();
  EXPECT(trebuchet_subscription_next(sub, 200, &event), TREBUCHET_TIMEOUT);
  double waited = now_ms() - start;
  /* Never before the timeout; the upper bound only ends a wait that never
     would. */
  CHECK(waited >= 150 && waited < 60000);
  CHECK(event.sequence == 99);
  EXPECT(trebuchet_subscription_next(sub, 0, &event), TREBUCHET_TIMEOUT);

  EXPECT(trebuchet_store_save(store, "c-other", (const uint8_t *)"x", 1, NULL), TREBUCHET_OK);
  EXPECT(trebuchet_store_save(store, "c-watched", (const uint8_t *)"x", 1, NULL), TREBUCHET_OK);
  EXPECT(trebuchet_store_delete(store, "c-watched", NULL), TREBUCHET_OK);
  EXPECT(trebuchet_subscription_next(sub, 10000, &event), TREBUCHET_OK);
  CHECK(event.kind == TREBUCHET_EVENT_SAVED);
  CHECK(strcmp(event.actor_id, "c-watched") == 0 && event.actor_id_len == 9);
  CHECK(event.sequence == 1);
  CHECK(event.timestamp_us > (int64_t)1600000000 * 1000000);
  EXPECT(trebuchet_subscription_next(sub, 10000, &event), TREBUCHET_OK);
  CHECK(event.kind == TREBUCHET_EVENT_DELETED && event.sequence == 2);
  trebuchet_subscription_free(&sub);
  printf("ok timeouts_and_changes\n");
}

struct waiter {
  trebuchet_subscription *sub;
  trebuchet_status status;
};

/* A wait of a minute: only the shutdown ends it sooner, with CLOSED rather
   than TIMEOUT. */
static void *wait_long(void *arg) {
  struct waiter *w = arg;
  trebuchet_event event;
  w->status = trebuchet_subscription_next(w->sub, 60000, &event);
  return NULL;
}

static void shutdown_with_waiter(trebuchet_store *store) {
  trebuchet_listener *listener = NULL;
  EXPECT(trebuchet_listener_open(store, &listener), TREBUCHET_OK);
  struct waiter w = {NULL, TREBUCHET_OK};
  EXPECT(trebuchet_listener_subscribe(listener, NULL, &w.sub), TREBUCHET_OK);
  pthread_t thread;
  CHECK(pthread_create(&thread, NULL, wait_long, &w) == 0);
  /* Most likely the waiter waits by now; a late one gets CLOSED at once,
     which passes too. tests/ffi.rs shuts down under a thread seen asleep in
     the wait. */
  struct timespec pause = {0, 300 * 1000 * 1000};
  nanosleep(&pause, NULL);
  EXPECT(trebuchet_listener_shutdown(listener), TREBUCHET_OK);
  CHECK(pthread_join(thread, NULL) == 0);
  CHECK(w.status == TREBUCHET_CLOSED);
  trebuchet_event event;
  EXPECT(trebuchet_subscription_next(w.sub, 0, &event), TREBUCHET_CLOSED);
  EXPECT(trebuchet_listener_shutdown(listener), TREBUCHET_OK); /* idempotent */
  trebuchet_subscription_free(&w.sub);
  trebuchet_listener_free(&listener);
  CHECK(listener == NULL);
  printf("ok shutdown_with_waiter\n");
}

/* A store opened from options on the same table and channel, with a pool of
 * two connections; the options are freed before the store is used. */
static void store_options(const char *url, const char *table, const char *channel) {
  trebuchet_store_options *options = NULL;
  EXPECT(trebuchet_store_options_new(&options), TREBUCHET_OK);
  EXPECT(trebuchet_store_options_url(options, url), TREBUCHET_OK);
  EXPECT(trebuchet_store_options_table(options, table), TREBUCHET_OK);
  EXPECT(trebuchet_store_options_channel(options, channel), TREBUCHET_OK);
  EXPECT(trebuchet_store_options_pool_size(options, 2), TREBUCHET_OK);
  EXPECT(trebuchet_store_options_pool_size(options, 0), TREBUCHET_INVALID_ARGUMENT);
  EXPECT(trebuchet_store_options_pool_size(NULL, 2), TREBUCHET_NULL_ARGUMENT);
  EXPECT(trebuchet_store_options_statement_timeout_ms(options, 30000), TREBUCHET_OK);
  EXPECT(trebuchet_store_options_group_commit(options, false), TREBUCHET_OK);
  EXPECT(trebuchet_store_options_migrate(options, true), TREBUCHET_OK);
  trebuchet_store *store = NULL;
  EXPECT(trebuchet_store_open_with(options, &store), TREBUCHET_OK);
  trebuchet_store_options_free(&options);
  CHECK(options == NULL);
  trebuchet_store_options_free(&options);
  trebuchet_pool_state pool;
  EXPECT(trebuchet_store_pool_state(store, &pool), TREBUCHET_OK);
  CHECK(pool.max_size == 2);
  uint64_t sequence = 0;
  EXPECT(trebuchet_store_save(store, "c-options", (const uint8_t *)"o", 1, &sequence), TREBUCHET_OK);
  CHECK(sequence == 1);
  trebuchet_store_free(&store);
  printf("ok store_options\n");
}

/* One write with options: a create, then an update with a time to live. */
static void general_write(trebuchet_store *store) {
  trebuchet_write_options *options = NULL;
  EXPECT(trebuchet_write_options_new(&options), TREBUCHET_OK);
  EXPECT(trebuchet_write_options_expect_absent(options), TREBUCHET_OK);
  uint64_t sequence = 0, actual = 99;
  EXPECT(trebuchet_store_save_with(store, "c-with", (const uint8_t *)"a", 1, options, &sequence),
         TREBUCHET_OK);
  CHECK(sequence == 1);
  EXPECT(trebuchet_store_save_with(store, "c-with", (const uint8_t *)"a", 1, options, &sequence),
         TREBUCHET_CONFLICT);
  CHECK(trebuchet_last_conflict_actual(&actual) && actual == 1);
  EXPECT(trebuchet_write_options_expect_sequence(options, 1), TREBUCHET_OK);
  EXPECT(trebuchet_write_options_ttl_ms(options, 60000), TREBUCHET_OK);
  EXPECT(trebuchet_store_save_with(store, "c-with", (const uint8_t *)"b", 1, options, &sequence),
         TREBUCHET_OK);
  CHECK(sequence == 2);
  EXPECT(trebuchet_store_save_with(store, "c-with", (const uint8_t *)"c", 1, NULL, &sequence),
         TREBUCHET_OK);
  CHECK(sequence == 3);
  EXPECT(trebuchet_write_options_ttl_ms(NULL, 1), TREBUCHET_NULL_ARGUMENT);
  trebuchet_write_options_free(&options);
  CHECK(options == NULL);
  trebuchet_write_options_free(NULL);
  printf("ok general_write\n");
}

/* Conditional bulk saves: one item conflicts, the others are written. */
static void conditional_bulk(trebuchet_store *store) {
  const char *ids[] = {"c-if-1", "c-if-2"};
  const uint8_t *data[] = {(const uint8_t *)"a", (const uint8_t *)"b"};
  size_t lens[] = {1, 1};
  uint64_t absent[] = {TREBUCHET_EXPECT_ABSENT, TREBUCHET_EXPECT_ABSENT};
  trebuchet_item_result results[2];
  EXPECT(trebuchet_store_save_many_if(store, 2, ids, data, lens, absent, results), TREBUCHET_OK);
  CHECK(results[0].status == TREBUCHET_OK && results[0].sequence == 1);
  CHECK(results[1].status == TREBUCHET_OK && results[1].sequence == 1);
  uint64_t expected[] = {1, 5};
  EXPECT(trebuchet_store_save_many_if(store, 2, ids, data, lens, expected, results), TREBUCHET_OK);
  CHECK(results[0].status == TREBUCHET_OK && results[0].sequence == 2);
  CHECK(results[1].status == TREBUCHET_CONFLICT && results[1].conflict_actual == 1);
  EXPECT(trebuchet_store_save_many_if(store, 2, ids, data, lens, expected, NULL),
         TREBUCHET_NULL_ARGUMENT);
  printf("ok conditional_bulk\n");
}

/* A batch of a conditional save, a save and a delete, then a failed one. */
static void batches(trebuchet_store *store) {
  EXPECT(trebuchet_store_save(store, "c-batch-1", (const uint8_t *)"x", 1, NULL), TREBUCHET_OK);
  EXPECT(trebuchet_store_save(store, "c-batch-gone", (const uint8_t *)"x", 1, NULL), TREBUCHET_OK);
  trebuchet_batch *batch = NULL;
  EXPECT(trebuchet_batch_new(store, &batch), TREBUCHET_OK);
  EXPECT(trebuchet_batch_save_if(batch, "c-batch-1", (const uint8_t *)"y", 1, 1), TREBUCHET_OK);
  EXPECT(trebuchet_batch_save(batch, "c-batch-2", (const uint8_t *)"z", 1), TREBUCHET_OK);
  EXPECT(trebuchet_batch_delete(batch, "c-batch-gone"), TREBUCHET_OK);
  size_t count = 0;
  EXPECT(trebuchet_batch_count(batch, &count), TREBUCHET_OK);
  CHECK(count == 3);
  trebuchet_step_result results[3];
  EXPECT(trebuchet_batch_commit(batch, count, results), TREBUCHET_OK);
  CHECK(results[0].sequence == 2 && results[1].sequence == 1);
  CHECK(results[2].sequence == 0 && results[2].deleted);
  EXPECT(trebuchet_batch_save_if(batch, "c-batch-1", (const uint8_t *)"w", 1, 1), TREBUCHET_OK);
  uint64_t actual = 0;
  EXPECT(trebuchet_batch_commit(batch, 0, NULL), TREBUCHET_CONFLICT);
  CHECK(trebuchet_last_conflict_actual(&actual) && actual == 2);
  trebuchet_batch_free(&batch);
  CHECK(batch == NULL);
  trebuchet_batch_free(&batch);
  printf("ok batches\n");
}

/* Versions and timestamps, one actor and several. */
static void versions(trebuchet_store *store) {
  EXPECT(trebuchet_store_save_with_ttl(store, "c-version", (const uint8_t *)"v", 1, 60000, NULL),
         TREBUCHET_OK);
  trebuchet_buffer *buffer = NULL;
  trebuchet_version version;
  EXPECT(trebuchet_store_load_with_version(store, "c-version", &buffer, &version), TREBUCHET_OK);
  CHECK(version.sequence == 1);
  CHECK(version.created_at_us > 0 && version.created_at_us <= version.updated_at_us);
  CHECK(version.expires_at_us > version.updated_at_us);
  trebuchet_buffer_free(&buffer);
  const char *asked[] = {"c-nobody", "c-version"};
  trebuchet_version found[2];
  EXPECT(trebuchet_store_load_many_versioned(store, 2, asked, NULL, found), TREBUCHET_OK);
  CHECK(found[0].sequence == 0 && found[0].updated_at_us == 0);
  CHECK(found[1].sequence == 1 && found[1].expires_at_us == version.expires_at_us);
  printf("ok versions\n");
}

int main(int argc, char **argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: %s URL TABLE CHANNEL\n", argv[0]);
    return 2;
  }
  trebuchet_store *store = NULL;
  EXPECT(trebuchet_store_open(argv[1], argv[2], argv[3], &store), TREBUCHET_OK);
  EXPECT(trebuchet_store_verify(store), TREBUCHET_SCHEMA_MISSING);
  CHECK(strlen(trebuchet_last_error()) > 0);
  EXPECT(trebuchet_store_migrate(store), TREBUCHET_OK);
  EXPECT(trebuchet_store_verify(store), TREBUCHET_OK);
  trebuchet_listener *listener = NULL;
  EXPECT(trebuchet_listener_open(store, &listener), TREBUCHET_OK);

  status_names();
  null_arguments(store);
  invalid_input(store);
  save_load_and_double_free(store);
  conditional_saves(store);
  conflict_data(store);
  time_to_live(store);
  bulk(store);
  listing(store);
  transforms(store);
  wrong_handles(store, listener);
  timeouts_and_changes(store, listener);
  shutdown_with_waiter(store);
  store_options(argv[1], argv[2], argv[3]);
  general_write(store);
  conditional_bulk(store);
  batches(store);
  versions(store);

  trebuchet_listener_free(&listener);
  trebuchet_store_free(&store);
  CHECK(store == NULL);
  printf("all passed\n");
  return 0;
}
