# Dependencies, all from Debian packages (libeigen3-dev, libboost-program-options-dev,
# nlohmann-json3-dev, doctest-dev, the CUDA toolkit). On the GPU machine, which has Eigen and
# doctest but no Boost.Program_options library, scripts/device.sh points NSA_EXTRA_PREFIX at a
# carried copy of the library and of the exact Boost headers it was built with.
if(NSA_EXTRA_PREFIX)
  include_directories(BEFORE SYSTEM ${NSA_EXTRA_PREFIX}/include)
  list(PREPEND CMAKE_PREFIX_PATH ${NSA_EXTRA_PREFIX})
endif()

find_package(Eigen3 3.3 REQUIRED NO_MODULE)
find_package(OpenMP REQUIRED COMPONENTS CXX)
find_package(doctest REQUIRED)

# Boost.Program_options: the package's CMake config, else the library and header found by hand.
find_package(Boost 1.71 QUIET COMPONENTS program_options)
if(NOT TARGET Boost::program_options)
  find_library(NSA_BOOST_PO_LIB NAMES libboost_program_options.a boost_program_options
               HINTS ${NSA_EXTRA_PREFIX}/lib REQUIRED)
  find_path(NSA_BOOST_INCLUDE boost/program_options.hpp HINTS ${NSA_EXTRA_PREFIX}/include REQUIRED)
  add_library(Boost::program_options UNKNOWN IMPORTED)
  set_target_properties(Boost::program_options PROPERTIES IMPORTED_LOCATION ${NSA_BOOST_PO_LIB}
                        INTERFACE_INCLUDE_DIRECTORIES ${NSA_BOOST_INCLUDE})
endif()

find_package(nlohmann_json 3.2 QUIET)
if(NOT TARGET nlohmann_json::nlohmann_json)
  find_path(NSA_JSON_INCLUDE nlohmann/json.hpp HINTS ${NSA_EXTRA_PREFIX}/include REQUIRED)
  add_library(nlohmann_json::nlohmann_json INTERFACE IMPORTED)
  set_target_properties(nlohmann_json::nlohmann_json PROPERTIES INTERFACE_INCLUDE_DIRECTORIES ${NSA_JSON_INCLUDE})
endif()

# CUDA: optional and detected.
set(NSA_WITH_CUDA OFF)
if(NOT NSA_CUDA STREQUAL "OFF")
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
      set(CMAKE_CUDA_ARCHITECTURES ${NSA_CUDA_ARCHS})
    endif()
    enable_language(CUDA)
    find_package(CUDAToolkit REQUIRED)
    set(CMAKE_CUDA_STANDARD 17)
    set(CMAKE_CUDA_STANDARD_REQUIRED ON)
    set(NSA_WITH_CUDA ON)
  elseif(NSA_CUDA STREQUAL "ON")
    message(FATAL_ERROR "NSA_CUDA=ON but no CUDA compiler was found (is nvcc on PATH?)")
  endif()
endif()
