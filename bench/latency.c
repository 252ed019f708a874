/*
 * Per-request latency at -c1, without wrk's correction (bench/README.md, "The -c1 tail").
 *
 * wrk adds samples for every slow answer ("coordinated omission" correction: it assumes requests
 * kept arriving at the mean rate while the slow one was outstanding), so its -c1 percentiles
 * describe the share of wall time spent in stalls rather than the requests themselves. This
 * client does what wrk -c1 does (one keep-alive connection, the next request as soon as the answer
 * is complete) and prints every request's latency in microseconds, one per line, then
 * `runtime <microseconds>` (what wrk divides by the requests made to get its correction's interval),
 * for the bench to reduce; it exits non-zero on any answer that is not 200.
 *
 *   latency PORT SECONDS REQUEST_FILE    (REQUEST_FILE: the whole GET request, bytes as sent)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static long long now_us(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (long long)t.tv_sec * 1000000 + t.tv_nsec / 1000;
}

int main(int argc, char **argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: latency PORT SECONDS REQUEST_FILE\n");
    return 2;
  }
  static char request[16384], answer[65536];
  FILE *file = fopen(argv[3], "rb");
  if (!file) { perror(argv[3]); return 2; }
  size_t request_length = fread(request, 1, sizeof request, file);
  fclose(file);

  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in address = { .sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(argv[1])) };
  inet_pton(AF_INET, "127.0.0.1", &address.sin_addr);
  if (connect(fd, (struct sockaddr *)&address, sizeof address) != 0) { perror("connect"); return 1; }
  int on = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on);

  long long begin = now_us();
  long long end = begin + (long long)(atof(argv[2]) * 1e6);
  for (;;) {
    long long start = now_us();
    if (start >= end) break;
    for (size_t sent = 0; sent < request_length;) {
      ssize_t n = write(fd, request + sent, request_length - sent);
      if (n <= 0) { perror("write"); return 1; }
      sent += (size_t)n;
    }
    size_t got = 0;
    for (;;) {
      if (got == sizeof answer - 1) { fprintf(stderr, "answer larger than %zu bytes\n", got); return 1; }
      ssize_t n = read(fd, answer + got, sizeof answer - 1 - got);
      if (n <= 0) { fprintf(stderr, "connection closed mid-answer\n"); return 1; }
      got += (size_t)n;
      answer[got] = '\0';
      char *head_end = strstr(answer, "\r\n\r\n");
      if (!head_end) continue;
      char *length = strcasestr(answer, "\ncontent-length:");
      if (!length || length > head_end) { fprintf(stderr, "answer without Content-Length\n"); return 1; }
      size_t body = strtoul(length + 16, NULL, 10);
      if (got >= (size_t)(head_end + 4 - answer) + body) break;
    }
    long long latency = now_us() - start;
    if (strncmp(answer, "HTTP/1.1 200 ", 13) != 0) { fprintf(stderr, "answer: %.40s\n", answer); return 1; }
    printf("%lld\n", latency);
  }
  printf("runtime %lld\n", now_us() - begin);
  return 0;
}
