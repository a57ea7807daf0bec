/*
 * kvm-smoke: proves that /dev/kvm runs guest code, with nothing but KVM
 * ioctls. Built static by build-initramfs.sh into the nested harness's L1
 * (resources/nested/README.md).
 *
 * A VM with one 64 KiB memory slot at guest physical 0 and one vCPU in
 * real mode runs, from 0x1000:
 *
 *     mov al, 0x42 ; out 0x10, al     -> KVM_EXIT_IO, port 0x10, 0x42
 *     mov ecx, N   ; 1: dec ecx ; jnz 1b
 *     hlt                             -> KVM_EXIT_HLT
 *
 * and reports each exit on stdout as a `KVM-SMOKE ...` line, then the
 * loop's speed (2N instructions) and the kvm_amd module's `nested` and
 * `npt` parameters. Exits 1 with a `KVM-SMOKE FAIL ...` line at the first
 * surprise. No in-kernel irqchip, so HLT exits to userspace.
 *
 *     kvm-smoke [N]        N defaults to 100000000 (~0.5 s nested)
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define MEM_SIZE 0x10000
#define CODE_ADDR 0x1000
#define PORT 0x10
#define VALUE 0x42

static void fail(const char *what)
{
	printf("KVM-SMOKE FAIL %s: %s\n", what, strerror(errno));
	exit(1);
}

static void fail_exit(const char *want, const struct kvm_run *run)
{
	printf("KVM-SMOKE FAIL wanted %s, got exit_reason=%u", want, run->exit_reason);
	if (run->exit_reason == KVM_EXIT_FAIL_ENTRY)
		printf(" hardware_entry_failure_reason=0x%llx",
		       (unsigned long long)run->fail_entry.hardware_entry_failure_reason);
	if (run->exit_reason == KVM_EXIT_INTERNAL_ERROR)
		printf(" suberror=%u", run->internal.suberror);
	printf("\n");
	exit(1);
}

/* Prints the kvm_amd module parameter NAME as `KVM-SMOKE NAME=VALUE`. */
static void print_param(const char *name)
{
	char path[128], value[32] = "absent";
	FILE *f;

	snprintf(path, sizeof(path), "/sys/module/kvm_amd/parameters/%s", name);
	f = fopen(path, "r");
	if (f) {
		if (!fgets(value, sizeof(value), f))
			strcpy(value, "unreadable");
		value[strcspn(value, "\n")] = 0;
		fclose(f);
	}
	printf("KVM-SMOKE %s=%s\n", name, value);
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	uint32_t n = argc > 1 ? (uint32_t)strtoul(argv[1], NULL, 0) : 100000000;
	const uint8_t code[] = {
		0xb0, VALUE,			/* mov al, VALUE */
		0xe6, PORT,			/* out PORT, al */
		0x66, 0xb9,			/* mov ecx, imm32 */
		n & 0xff, (n >> 8) & 0xff, (n >> 16) & 0xff, n >> 24,
		0x66, 0x49,			/* 1: dec ecx */
		0x75, 0xfc,			/* jnz 1b */
		0xf4,				/* hlt */
	};
	struct kvm_userspace_memory_region region;
	struct kvm_sregs sregs;
	struct kvm_regs regs;
	struct kvm_run *run;
	int kvm, vm, vcpu, api, mmap_size;
	uint8_t *mem;
	double start, seconds;

	setvbuf(stdout, NULL, _IOLBF, 0);
	if (n == 0) {
		printf("KVM-SMOKE FAIL the loop count must be at least 1\n");
		return 1;
	}
	kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0)
		fail("open /dev/kvm");
	api = ioctl(kvm, KVM_GET_API_VERSION, 0);
	if (api != KVM_API_VERSION) {
		printf("KVM-SMOKE FAIL KVM_GET_API_VERSION=%d\n", api);
		return 1;
	}
	vm = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm < 0)
		fail("KVM_CREATE_VM");

	mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		fail("mmap guest memory");
	memcpy(mem + CODE_ADDR, code, sizeof(code));
	region = (struct kvm_userspace_memory_region){
		.slot = 0,
		.guest_phys_addr = 0,
		.memory_size = MEM_SIZE,
		.userspace_addr = (uintptr_t)mem,
	};
	if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
		fail("KVM_SET_USER_MEMORY_REGION");

	vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
	if (vcpu < 0)
		fail("KVM_CREATE_VCPU");
	mmap_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	if (mmap_size < (int)sizeof(*run))
		fail("KVM_GET_VCPU_MMAP_SIZE");
	run = mmap(NULL, mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	if (run == MAP_FAILED)
		fail("mmap kvm_run");

	/* Real mode, CS:IP = 0000:1000. */
	if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0)
		fail("KVM_GET_SREGS");
	sregs.cs.base = 0;
	sregs.cs.selector = 0;
	if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0)
		fail("KVM_SET_SREGS");
	memset(&regs, 0, sizeof(regs));
	regs.rip = CODE_ADDR;
	regs.rflags = 0x2;
	if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
		fail("KVM_SET_REGS");

	if (ioctl(vcpu, KVM_RUN, 0) < 0)
		fail("KVM_RUN");
	if (run->exit_reason != KVM_EXIT_IO || run->io.direction != KVM_EXIT_IO_OUT ||
	    run->io.size != 1 || run->io.count != 1)
		fail_exit("a one-byte KVM_EXIT_IO out", run);
	{
		uint8_t value = *((uint8_t *)run + run->io.data_offset);

		if (run->io.port != PORT || value != VALUE) {
			printf("KVM-SMOKE FAIL wanted port=0x%x value=0x%x, got port=0x%x value=0x%x\n",
			       PORT, VALUE, run->io.port, value);
			return 1;
		}
		printf("KVM-SMOKE ok exit=IO port=0x%x value=0x%x\n", run->io.port, value);
	}

	start = now();
	if (ioctl(vcpu, KVM_RUN, 0) < 0)
		fail("KVM_RUN");
	seconds = now() - start;
	if (run->exit_reason != KVM_EXIT_HLT)
		fail_exit("KVM_EXIT_HLT", run);
	if (ioctl(vcpu, KVM_GET_REGS, &regs) < 0)
		fail("KVM_GET_REGS");
	if ((regs.rcx & 0xffffffff) != 0 || regs.rip != CODE_ADDR + sizeof(code)) {
		printf("KVM-SMOKE FAIL after HLT ecx=0x%llx rip=0x%llx, wanted 0 and 0x%zx\n",
		       (unsigned long long)regs.rcx, (unsigned long long)regs.rip,
		       CODE_ADDR + sizeof(code));
		return 1;
	}
	printf("KVM-SMOKE ok exit=HLT rip=0x%llx\n", (unsigned long long)regs.rip);
	printf("KVM-SMOKE loop instructions=%llu seconds=%.3f minstr_per_s=%.0f\n",
	       2ULL * n, seconds, 2.0 * n / seconds / 1e6);
	print_param("nested");
	print_param("npt");
	return 0;
}
