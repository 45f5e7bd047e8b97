// A minimal TVM RPC server for aarch64 Linux (Apache TVM 0.27 runtime).
//
// It speaks the same protocol as `python -m tvm.exec.rpc_server`, so the ordinary x86 Python
// client (`tvm.rpc.connect`, exporters.tvm_rpc.connect) can upload a compiled library, load it in a
// Relax VM on the device, run it and time it.  It needs no Python on the device: only this binary,
// libtvm_runtime.so and libtvm_ffi.so from the aarch64 apache-tvm / apache-tvm-ffi wheels.
// scripts/build_aarch64_rpc_server.sh builds it; runtime_tests/emulated_device.py runs it under
// qemu-aarch64-static.
//
//   aarch64_rpc_server [--host ADDR] [--port N] [--key KEY] [--work-dir DIR]
//
//   --host ADDR     IPv4 address to listen on (default 127.0.0.1; 0.0.0.0 on a real board).
//   --port N        TCP port (default 9090; 0 picks a free one).  The chosen port is printed as
//                   "listening on ADDR:PORT" once the server accepts connections.
//   --key KEY       RPC key the client must present ("client:KEY"); default "" as tvm.rpc.connect.
//   --work-dir DIR  where uploaded files go (default: a fresh /tmp/tvm-rpc-XXXXXX).
//
// The actual RPC protocol (upload, load_module, remote functions, time_evaluator) is
// libtvm_runtime's `rpc.ServerLoop`; this program only does what the Python server does around
// it: listen, answer the handshake, set the session's work path and module loader, and serve one
// session per accepted connection.  Each session runs in a forked child, so modules loaded by one
// client, or a crash inside one, never reach the next session.
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/string.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

namespace {

namespace ffi = tvm::ffi;

// Handshake codes, as in python/tvm/rpc/base.py.
constexpr int32_t kRPCMagic = 0xFF271;
constexpr int32_t kRPCCodeSuccess = kRPCMagic + 0;
constexpr int32_t kRPCCodeMismatch = kRPCMagic + 2;
constexpr int32_t kMaxKeyLength = 4096;

struct Options {
  std::string host = "127.0.0.1";
  int port = 9090;
  std::string key;
  std::string work_dir;
};

std::string g_work_dir;  // set once in main, read by the session hooks

void Log(const std::string& message) {
  std::printf("[aarch64-rpc] %s\n", message.c_str());
  std::fflush(stdout);
}

[[noreturn]] void Usage(const char* program, const std::string& error) {
  std::fprintf(stderr, "%s: %s\nusage: %s [--host ADDR] [--port N] [--key KEY] [--work-dir DIR]\n",
               program, error.c_str(), program);
  std::exit(2);
}

Options ParseOptions(int argc, char** argv) {
  Options options;
  for (int i = 1; i < argc; ++i) {
    std::string flag = argv[i];
    if (flag == "-h" || flag == "--help") Usage(argv[0], "a TVM RPC server");
    if (i + 1 >= argc) Usage(argv[0], "missing value after " + flag);
    std::string value = argv[++i];
    if (flag == "--host") {
      options.host = value;
    } else if (flag == "--port") {
      char* end = nullptr;
      long port = std::strtol(value.c_str(), &end, 10);
      if (*end != '\0' || port < 0 || port > 65535) Usage(argv[0], "bad port " + value);
      options.port = static_cast<int>(port);
    } else if (flag == "--key") {
      options.key = value;
    } else if (flag == "--work-dir") {
      options.work_dir = value;
    } else {
      Usage(argv[0], "unknown option " + flag);
    }
  }
  return options;
}

bool RecvAll(int fd, void* buffer, size_t size) {
  size_t got = 0;
  while (got < size) {
    ssize_t n = recv(fd, static_cast<char*>(buffer) + got, size - got, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    got += static_cast<size_t>(n);
  }
  return true;
}

bool SendAll(int fd, const void* buffer, size_t size) {
  size_t sent = 0;
  while (sent < size) {
    ssize_t n = send(fd, static_cast<const char*>(buffer) + sent, size - sent, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    sent += static_cast<size_t>(n);
  }
  return true;
}

// Client sends: magic, key length, "client:KEY [-opt=value ...]".  Server answers with the
// success code, then its own key "server:KEY"; or with the mismatch code and closes.
bool Handshake(int fd, const std::string& key) {
  int32_t magic = 0, length = 0;
  if (!RecvAll(fd, &magic, 4) || magic != kRPCMagic) return false;
  if (!RecvAll(fd, &length, 4) || length < 0 || length > kMaxKeyLength) return false;
  std::string client_key(static_cast<size_t>(length), '\0');
  if (length > 0 && !RecvAll(fd, &client_key[0], client_key.size())) return false;
  std::string first = client_key.substr(0, client_key.find(' '));  // options after a space are ignored
  if (first != "client:" + key) {
    Log("refused a client with key '" + client_key + "'");
    SendAll(fd, &kRPCCodeMismatch, 4);
    return false;
  }
  std::string server_key = "server:" + key;
  int32_t server_key_length = static_cast<int32_t>(server_key.size());
  return SendAll(fd, &kRPCCodeSuccess, 4) && SendAll(fd, &server_key_length, 4) &&
         SendAll(fd, server_key.data(), server_key.size());
}

// A client-given file name inside the work dir; names that would leave it are refused.
std::string WorkPath(const std::string& name) {
  if (name.empty() || name[0] == '/' || name.find("..") != std::string::npos) {
    TVM_FFI_THROW(ValueError) << "file name '" << name << "' is not a plain name inside the work dir";
  }
  return g_work_dir + "/" + name;
}

// The hooks libtvm_runtime's RPC server calls: where uploads go, and how `load_module` loads.
void RegisterSessionHooks() {
  ffi::Function::SetGlobal("tvm.rpc.server.workpath", ffi::Function::FromTyped([](ffi::String name) {
                             return ffi::String(WorkPath(std::string(name)));
                           }),
                           /*override=*/true);
  ffi::Function::SetGlobal("tvm.rpc.server.load_module", ffi::Function::FromTyped([](ffi::String name) {
                             std::string path = WorkPath(std::string(name));
                             Log("load_module " + path);
                             return ffi::Module::LoadFromFile(path);
                           }),
                           /*override=*/true);
}

int Listen(const Options& options, int* bound_port) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return -1;
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(static_cast<uint16_t>(options.port));
  if (inet_pton(AF_INET, options.host.c_str(), &address.sin_addr) != 1) {
    std::fprintf(stderr, "bad IPv4 address %s\n", options.host.c_str());
    return -1;
  }
  if (bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0 || listen(fd, 8) != 0) {
    std::perror(("listen on " + options.host + ":" + std::to_string(options.port)).c_str());
    close(fd);
    return -1;
  }
  socklen_t size = sizeof(address);
  getsockname(fd, reinterpret_cast<sockaddr*>(&address), &size);
  *bound_port = ntohs(address.sin_port);
  return fd;
}

// Serves one accepted connection in a child process; returns when the client has gone.
void ServeSession(int connection, const std::string& key, const ffi::Function& server_loop) {
  pid_t child = fork();
  if (child < 0) {
    std::perror("fork");
    return;
  }
  if (child == 0) {
    prctl(PR_SET_PDEATHSIG, SIGTERM);  // never outlive the server
    if (!Handshake(connection, key)) _exit(1);
    Log("session started");
    try {
      server_loop(connection);  // runs the RPC protocol until the client disconnects
    } catch (const std::exception& error) {
      Log(std::string("session failed: ") + error.what());
      _exit(1);
    }
    Log("session ended");
    _exit(0);
  }
  int status = 0;
  while (waitpid(child, &status, 0) < 0 && errno == EINTR) {
  }
  if (WIFSIGNALED(status)) Log("session process killed by signal " + std::to_string(WTERMSIG(status)));
}

}  // namespace

int main(int argc, char** argv) {
  Options options = ParseOptions(argc, argv);
  signal(SIGPIPE, SIG_IGN);  // a vanished client is an error return, not the end of the server

  if (options.work_dir.empty()) {
    char pattern[] = "/tmp/tvm-rpc-XXXXXX";
    if (mkdtemp(pattern) == nullptr) {
      std::perror("mkdtemp");
      return 1;
    }
    options.work_dir = pattern;
  } else if (mkdir(options.work_dir.c_str(), 0700) != 0 && errno != EEXIST) {
    std::perror(("mkdir " + options.work_dir).c_str());
    return 1;
  }
  g_work_dir = options.work_dir;
  RegisterSessionHooks();

  std::optional<ffi::Function> server_loop = ffi::Function::GetGlobal("rpc.ServerLoop");
  if (!server_loop.has_value()) {
    std::fprintf(stderr, "libtvm_runtime has no rpc.ServerLoop (built without RPC?)\n");
    return 1;
  }

  int port = 0;
  int listener = Listen(options, &port);
  if (listener < 0) return 1;
  Log("work dir " + g_work_dir);
  Log("listening on " + options.host + ":" + std::to_string(port));

  while (true) {
    int connection = accept(listener, nullptr, nullptr);
    if (connection < 0) {
      if (errno == EINTR) continue;
      std::perror("accept");
      return 1;
    }
    ServeSession(connection, options.key, *server_loop);
    close(connection);
  }
}
